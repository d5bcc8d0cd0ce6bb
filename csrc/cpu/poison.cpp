#include "rosita_fast/poison.h"

#include <torch/library.h>

#include <atomic>
#include <limits>

namespace rosita_fast {
namespace {
std::atomic<bool> g_poison{false};

void set_poison_outputs(bool enable) { g_poison.store(enable); }
}  // namespace

bool poison_outputs_enabled() { return g_poison.load(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  if (poison_outputs_enabled()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("set_poison_outputs(bool enable) -> ()");
  m.impl("set_poison_outputs", c10::DispatchKey::CompositeExplicitAutograd, &set_poison_outputs);
}

}  // namespace rosita_fast
