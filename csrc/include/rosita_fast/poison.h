// Output poisoning for tests: when enabled, every output buffer a C++ kernel allocates starts as
// NaN, so elements a kernel forgets to write show up in the comparison with the reference.
#pragma once

#include <ATen/ATen.h>

namespace rosita_fast {

bool poison_outputs_enabled();

// at::empty, or an all-NaN tensor while poisoning is enabled.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace rosita_fast
