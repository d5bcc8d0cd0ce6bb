// The dense GEMMs of the C++ CPU kernels, through oneDNN where it is the fastest library here.
//
// torch's default CPU GEMM for fp32 (at::addmm / at::mm, i.e. MKL) runs at about half the speed of
// oneDNN's inner-product primitive on the AMD EPYC development machines (measured, 1 thread, fp32:
// [64 x 768] @ [768 x 384]^T 585 vs 369 us, [1024 x 512] @ [512 x 768]^T 12.5 vs 5.3 ms). oneDNN is
// reached through the dispatcher as torch's own `mkldnn::_linear_pointwise` ops (no oneDNN headers
// or link flags): they take plain, strided (transposed views included) or prepacked weights, fuse
// bias + GELU (or ReLU) or a residual add into the GEMM, and accumulate bf16 in fp32.
//
// Path per GEMM dtype (gemm_dtype below), measured with 1 thread at the BERT shapes:
// - fp32: oneDNN for the forward and for both backward products (transposed views, ~2x at::mm),
//   except small products: a oneDNN call costs ~15-30 us whatever its size (primitive lookup,
//   weight reorder), so below kMinMacs multiply-adds (kMinMacsPacked with a prepacked weight)
//   at::addmm / at::mm (MKL) is faster (e.g. 1 row of 768 x 768: 37 vs 41 us unpacked; 4 rows of
//   768 x 128: 16 vs 22 us unpacked, 16 us packed).
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

#include <cstdint>
#include <cstring>
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

// fp32 products smaller than this (m * n * k) go to MKL, unpacked / with a packed weight.
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

// Whether an [m, k] x [k, n] product in GEMM dtype t should go to oneDNN (see the top of the file);
// with_packed: a prepacked weight is at hand.
inline bool prefer(at::ScalarType t, int64_t m, int64_t n, int64_t k, bool with_packed) {
  if (m == 0 || n == 0 || k == 0 || !usable(t)) return false;
  return t != at::kFloat || m * n * k >= (with_packed ? kMinMacsPacked : kMinMacs);
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
// mm_nt(dZ.t(), X.t())), by the path measured fastest for the dtype: oneDNN with the transposed
// views for fp32 (small ones: at::mm), at::mm otherwise (bf16: ATen's oneDNN matmul; fp64). a and
// b share a dtype that is not fp16 (convert first: gemm_dtype).
inline at::Tensor mm_nt(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat && prefer(at::kFloat, a.size(0), b.size(0), a.size(1), false)) {
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
