// The dense GEMMs of the C++ CPU kernels: oneDNN or ATen (MKL), whichever is faster on this CPU.
//
// Which library multiplies fastest depends on the CPU. oneDNN's inner-product primitive (reached
// through the dispatcher as torch's own `mkldnn::_linear_pointwise` ops: no oneDNN headers or link
// flags) fuses bias + GELU/ReLU or a residual add into the GEMM and takes plain, strided
// (transposed views) or prepacked weights. torch's default CPU GEMM (at::addmm / at::mm, MKL in
// torch's wheels) has no fused epilogue; the kernels then finish the product in their own row pass.
// Measured with 1 thread, fp32, at the BERT layer shapes: on one AMD EPYC VM oneDNN ran at twice
// MKL's speed ([1024 x 512] @ [512 x 768]^T: 5.3 vs 12.5 ms); on another (AMD EPYC, Zen 3, AVX2
// only) MKL was faster at every shape (640 and 2048 rows, 1 and 2 threads: forward 5-20 %, dX
// 8-44 %, dW 24-77 %; 640 x 384 x 1152: 6.1 vs 6.4 ms forward, 6.2 vs 8.2 ms dW).
//
// So the fp32 route is a per-machine choice (GemmRoute):
// - auto (default): both libraries are timed once on a BERT-layer-sized product, separately for
//   the forward (x @ W^T, contiguous W) and the backward products (transposed views), and oneDNN
//   is kept for a kind only where it is at least 5 % faster (calibration(), ~0.15-0.3 s). Python
//   measures it once per machine and installs the cached result in every later process
//   (set_calibration; rosita_fast/ops/_gemm_route.py), so all processes on a machine agree;
//   without that the first large fp32 product measures it;
// - onednn / aten: forced (rosita_fast.ops.set_gemm_route, or ROSITA_FAST_GEMM at import).
// Small fp32 products always go to ATen: a oneDNN call costs ~15-30 us whatever its size
// (primitive lookup, weight reorder), so below kMinMacs multiply-adds (kMinMacsPacked with a
// prepacked weight) at::addmm is faster (1 row of 768 x 768: 37 vs 41 us unpacked).
// Other GEMM dtypes (gemm_dtype below):
// - bf16: oneDNN `_linear_pointwise` for the forward (fused epilogue; at or below at::addmm);
//   at::mm for the backward products, which ATen itself sends to oneDNN's matmul primitive for
//   bf16 on AVX512-BF16 CPUs (the same speed as `_linear_pointwise` for dX, 10-40% faster for dW).
// - fp16: no fp16 GEMM on CPUs without AVX512-FP16/AVX-NE-CONVERT (oneDNN rejects it; at::addmm in
//   fp16 is ~9x slower than converting): inputs are converted to fp32 and take the fp32 path.
// - fp64: oneDNN has no fp64 GEMM: at::addmm / at::mm.
// Whether oneDNN serves a dtype is probed once per process (a 1 x 1 product), so a torch built
// without MKLDNN or a CPU without bf16 support falls back to at::addmm / at::mm, the documented
// per-case route, never an error.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string_view>

namespace rosita_fast {
namespace onednn {

// fp16 products run in fp32 (see above); every other dtype runs in itself.
inline at::ScalarType gemm_dtype(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

namespace detail {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            std::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<std::string_view>);
using LinearAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::string_view);

// The typed handles of the two ops, resolved once (nullopt where torch has no MKLDNN).
inline const std::optional<c10::TypedOperatorHandle<LinearFn>>& linear_op() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value()) return std::nullopt;
    return h->typed<LinearFn>();
  }();
  return op;
}

inline const std::optional<c10::TypedOperatorHandle<LinearAddFn>>& linear_add_op() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<LinearAddFn>> {
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
    if (!h.has_value()) return std::nullopt;
    return h->typed<LinearAddFn>();
  }();
  return op;
}

inline bool probe(at::ScalarType t) {
  if (!linear_op().has_value() || !linear_add_op().has_value() || !at::hasMKLDNN()) return false;
  try {
    const auto opts = at::TensorOptions().dtype(t);
    const auto a = at::ones({1, 1}, opts);
    const auto y = linear_op()->call(a, a, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                                      std::string_view(""));
    return y.scalar_type() == t && y.item<double>() == 1.0;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace detail

// fp32 products smaller than this (m * n * k) go to ATen, unpacked / with a packed weight.
constexpr int64_t kMinMacs = int64_t{1} << 20;
constexpr int64_t kMinMacsPacked = int64_t{1} << 18;

// Whether oneDNN's linear ops serve GEMM dtype t in this process (probed once per dtype).
inline bool usable(at::ScalarType t) {
  if (t == at::kFloat) {
    static const bool ok = detail::probe(at::kFloat);
    return ok;
  }
  if (t == at::kBFloat16) {
    static const bool ok = detail::probe(at::kBFloat16);
    return ok;
  }
  return false;
}

// The fp32 route (see the top of the file).
enum class GemmRoute : int64_t { kAuto = 0, kOneDNN = 1, kATen = 2 };

inline std::atomic<int64_t>& route_setting() {
  static std::atomic<int64_t> route{static_cast<int64_t>(GemmRoute::kAuto)};
  return route;
}

// Microseconds per product, best of a few, for each library and kind.
struct Calibration {
  double forward_onednn = 0, forward_aten = 0, backward_onednn = 0, backward_aten = 0;
  bool forward_uses_onednn() const { return forward_onednn < 0.95 * forward_aten; }
  bool backward_uses_onednn() const { return backward_onednn < 0.95 * backward_aten; }
};

namespace detail {

template <typename F> double best_us(F&& f, int reps) {
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return best;
}

// One BERT-layer-sized product of each kind (512 tokens, 384 -> 1152 features; the backward kind
// is dX = dY W plus dW = dY^T X through transposed views), each library warmed up once, then the
// best of rounds that alternate the libraries (so a burst of other load hits both).
inline Calibration calibrate() {
  Calibration c;
  if (!usable(at::kFloat)) return c;
  const int64_t m = 512, k = 384, n = 1152;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const auto x = at::rand({m, k}, opts), w = at::rand({n, k}, opts), b = at::rand({n}, opts);
  const auto dy = at::rand({m, n}, opts);
  const auto none = c10::List<std::optional<at::Scalar>>();
  const auto dnn = [&](const at::Tensor& a, const at::Tensor& bt, const std::optional<at::Tensor>& bias) {
    return linear_op()->call(a, bt, bias, "none", none, std::string_view(""));
  };
  const auto fwd_dnn = [&] { dnn(x, w, b); };
  const auto fwd_aten = [&] { at::addmm(b, x, w.t()); };
  const auto bwd_dnn = [&] { dnn(dy, w.t(), std::nullopt); dnn(dy.t(), x.t(), std::nullopt); };
  const auto bwd_aten = [&] { at::mm(dy, w); at::mm(dy.t(), x); };
  c.forward_onednn = c.forward_aten = c.backward_onednn = c.backward_aten = 1e300;
  for (int round = 0; round < 4; ++round) {
    const int reps = round == 0 ? 1 : 2;  // round 0 warms up (primitive creation, page faults)
    const double fd = best_us(fwd_dnn, reps), fa = best_us(fwd_aten, reps);
    const double bd = best_us(bwd_dnn, reps), ba = best_us(bwd_aten, reps);
    if (round == 0) continue;
    c.forward_onednn = std::min(c.forward_onednn, fd);
    c.forward_aten = std::min(c.forward_aten, fa);
    c.backward_onednn = std::min(c.backward_onednn, bd);
    c.backward_aten = std::min(c.backward_aten, ba);
  }
  return c;
}

struct CalibrationState {
  std::mutex mutex;
  bool done = false;
  Calibration value;
};
inline CalibrationState& calibration_state() {
  static CalibrationState state;
  return state;
}
}  // namespace detail

// The calibration this process decides by: measured on first use (all zeros where oneDNN has no
// fp32), unless one was installed first with set_calibration.
inline Calibration calibration() {
  auto& state = detail::calibration_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (!state.done) {
    state.value = detail::calibrate();
    state.done = true;
  }
  return state.value;
}

// Install a calibration (rosita_fast keeps the first one measured on a machine in its cache, so
// that every process there routes alike: two libraries round differently, and a resumed or
// repeated run must compute what the first did).
inline void set_calibration(const Calibration& c) {
  auto& state = detail::calibration_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.value = c;
  state.done = true;
}

enum class GemmKind { kForward, kBackward };

// Whether fp32 products of this kind go to oneDNN under the current route.
inline bool fp32_onednn(GemmKind kind) {
  switch (static_cast<GemmRoute>(route_setting().load(std::memory_order_relaxed))) {
    case GemmRoute::kOneDNN: return true;
    case GemmRoute::kATen: return false;
    case GemmRoute::kAuto: break;
  }
  const auto c = calibration();
  return kind == GemmKind::kForward ? c.forward_uses_onednn() : c.backward_uses_onednn();
}

// Whether an [m, k] x [k, n] product in GEMM dtype t should go to oneDNN (see the top of the file);
// with_packed: a prepacked weight is at hand; kind: a forward product (x @ W^T) or a backward one.
inline bool prefer(at::ScalarType t, int64_t m, int64_t n, int64_t k, bool with_packed,
                   GemmKind kind = GemmKind::kForward) {
  if (m == 0 || n == 0 || k == 0 || !usable(t)) return false;
  if (t != at::kFloat) return true;
  return m * n * k >= (with_packed ? kMinMacsPacked : kMinMacs) && fp32_onednn(kind);
}

// act(x @ w^T + b) by oneDNN. x: [M, K] with unit stride along K; w: [N, K] (any strides: a
// transposed view of a [K, N] tensor is used as is) or a prepacked MKLDNN tensor
// (`torch.ops.mkldnn._reorder_linear_weight`); b: [N] or none; all of one dtype with usable(dtype).
// attr: "none", "gelu" with algorithm "none" (erf) or "tanh" (NaN propagates like torch's), or
// "relu" (which maps NaN to 0, unlike torch.relu). Returns [M, N], contiguous.
inline at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& w,
                                   const std::optional<at::Tensor>& b,
                                   std::string_view attr = "none", std::string_view algorithm = "") {
  return detail::linear_op()->call(x, w, b, attr, c10::List<std::optional<at::Scalar>>(),
                                   std::optional<std::string_view>(algorithm));
}

// x @ w^T + b + other by oneDNN, the add fused into the GEMM's epilogue (before the result is
// rounded to the output dtype). other: [M, N], any strides.
inline at::Tensor linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w,
                             const std::optional<at::Tensor>& b) {
  return detail::linear_add_op()->call(x, other, w, b, "add");
}

// a @ b^T for the backward products (dX = dZ @ W as mm_nt(dZ, W.t()), dW = dZ^T @ X as
// mm_nt(dZ.t(), X.t())): for fp32 oneDNN with the transposed views where the route picks it for
// backward products (small ones: at::mm), at::mm otherwise (bf16: ATen's oneDNN matmul; fp64). a
// and b share a dtype that is not fp16 (convert first: gemm_dtype).
inline at::Tensor mm_nt(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat &&
      prefer(at::kFloat, a.size(0), b.size(0), a.size(1), false, GemmKind::kBackward)) {
    return linear_pointwise(a, b, std::nullopt);
  }
  return at::mm(a, b.t());
}

}  // namespace onednn

// ---- element conversions for the row passes that finish or feed these GEMMs ---------------------
// Written with integer bit operations so loops over a row vectorize (c10's conversions may not).

#define ROSITA_CVT_INLINE inline __attribute__((always_inline))

ROSITA_CVT_INLINE float bf16_to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet (what c10::BFloat16(float) does).
ROSITA_CVT_INLINE c10::BFloat16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// Load as the accumulation type A (float or double) / store from it.
template <typename A, typename T> ROSITA_CVT_INLINE A load_acc(T v) { return static_cast<A>(v); }
template <> ROSITA_CVT_INLINE float load_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  return bf16_to_float(v);
}
template <> ROSITA_CVT_INLINE float load_acc<float, c10::Half>(c10::Half v) {
  return static_cast<float>(v);
}
template <typename T, typename A> ROSITA_CVT_INLINE T store_as(A v) { return static_cast<T>(v); }
template <> ROSITA_CVT_INLINE c10::BFloat16 store_as<c10::BFloat16, float>(float v) {
  return float_to_bf16(v);
}
template <> ROSITA_CVT_INLINE c10::Half store_as<c10::Half, float>(float v) { return c10::Half(v); }

#undef ROSITA_CVT_INLINE

}  // namespace rosita_fast
