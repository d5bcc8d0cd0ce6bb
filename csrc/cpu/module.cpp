// Python entry point of rosita_fast._C. The ops register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT) when the library loads; the module object itself carries nothing.
#include <Python.h>

static struct PyModuleDef rosita_fast_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                   nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rosita_fast_C_module); }
