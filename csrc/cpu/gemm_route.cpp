// The fp32 GEMM route of the C++ kernels (oneDNN or ATen; see rosita_fast/onednn_linear.h), set and
// read from Python by rosita_fast.ops.gemm_route / set_gemm_route.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "rosita_fast/onednn_linear.h"

namespace rosita_fast {
namespace {

void set_route(int64_t route) {
  TORCH_CHECK(route >= 0 && route <= 2, "set_gemm_route: route code must be 0 (auto), 1 (onednn) "
              "or 2 (aten), got ", route);
  onednn::route_setting().store(route);
}

// [setting, forward uses oneDNN, backward uses oneDNN, then the calibration's microseconds:
// forward oneDNN, forward ATen, backward oneDNN, backward ATen]. Calibrates if it has not yet.
std::vector<double> route_info() {
  const auto c = onednn::calibration();
  const bool usable = onednn::usable(at::kFloat);
  return {static_cast<double>(onednn::route_setting().load()),
          usable && onednn::fp32_onednn(onednn::GemmKind::kForward) ? 1.0 : 0.0,
          usable && onednn::fp32_onednn(onednn::GemmKind::kBackward) ? 1.0 : 0.0,
          c.forward_onednn, c.forward_aten, c.backward_onednn, c.backward_aten};
}

// Install a calibration: [forward oneDNN, forward ATen, backward oneDNN, backward ATen] us.
void set_calibration(const std::vector<double>& us) {
  TORCH_CHECK(us.size() == 4, "set_gemm_calibration: expected 4 timings, got ", us.size());
  for (const double t : us) {
    TORCH_CHECK(t >= 0 && std::isfinite(t), "set_gemm_calibration: timings must be finite and "
                ">= 0");
  }
  onednn::set_calibration({us[0], us[1], us[2], us[3]});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("set_gemm_route(int route) -> ()", &set_route);
  m.def("gemm_route_info() -> float[]", &route_info);
  m.def("set_gemm_calibration(float[] us) -> ()", &set_calibration);
}

}  // namespace rosita_fast
