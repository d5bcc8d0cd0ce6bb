// Python entry point of rosita_fast._C_cuda; the CUDA ops register themselves when it loads.
#include <Python.h>

static struct PyModuleDef rosita_fast_C_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr,
                                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&rosita_fast_C_cuda_module); }
