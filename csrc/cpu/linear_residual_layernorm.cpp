// C++ CPU kernels for BERT's SelfOutput/Output block: out = LayerNorm(x @ W^T + b + residual).
//
// Forward: one oneDNN inner product with the bias and the residual add in its epilogue
// (rosita_fast/onednn_linear.h), giving y = x W^T + b + residual; then one pass over the rows,
// parallel over threads, that normalizes each row while it is in L1 (statistics in fp32, or fp64
// for fp64: two passes over the hot row, mean then the centred sum of squares, then the affine
// write). Inference normalizes y in place. Training also keeps y (the GEMM's output: x's dtype,
// fp32 for fp16) and each row's mean and 1/std (fp32): with them the backward replays the forward's
// normalized rows exactly, and they cost what the normalized rows would (M x N elements; 8 bytes
// per row more), while keeping only the output would force the backward to recompute the GEMM.
// Backward: one pass per row (parallel, per-thread partial column sums) computes the LayerNorm
// gradient dy, which is also the residual's gradient and the GEMM output's gradient, and sums
// dln_weight, dln_bias and dbias in the same pass; then dX = dy W and dW = dy^T X (onednn::mm_nt).
// The GEMM is not split into row blocks normalized straight out of it: a oneDNN call costs ~15-30 us
// whatever its size, more than the separate pass over y (about a tenth of the GEMM's time at
// 1024 x 512 x 768 fp32, one thread).
// Dropout (training only): BERT drops elements of the dense output before the residual add, so
// with p > 0 the GEMM keeps only the bias in its epilogue and one pass per row applies the
// counter-based mask (rosita_fast/dropout.h: a hash of (seed, row, column), nothing stored) and
// adds the residual in place; the backward regenerates the mask to turn dy (the residual's
// gradient) into the dense output's gradient dz = dy * mask * scale before the two GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/dropout.h"
#include "rosita_fast/onednn_linear.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

// Smallest amount of row work (elements) worth a thread of its own.
constexpr int64_t kMinTaskElems = 1 << 14;
// Independent partial sums per row reduction: enough lanes for the compiler to vectorize it
// without reassociating (two AVX-512 / four AVX2 registers of fp32).
constexpr int kLanes = 16;

template <typename T> using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- forward rows -------------------------------------------------------------------------------

// Rows [0, rows) of y (row stride n) normalized into out (may be y): out = (y - mean) * rstd *
// gamma + beta. mean/rstd receive each row's statistics when not null.
template <typename Y, typename O, typename Acc>
ROSITA_ALWAYS_INLINE void ln_rows_body(const Y* y, O* out, const Acc* gamma, const Acc* beta,
                                       int64_t rows, int64_t n, Acc eps, Acc* mean_out,
                                       Acc* rstd_out) {
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const int64_t n_vec = n / kLanes * kLanes;
  for (int64_t i = 0; i < rows; ++i) {
    const Y* yr = y + i * n;
    O* orow = out + i * n;
    Acc lanes[kLanes] = {};
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += load_acc<Acc>(yr[j + l]);
    }
    Acc sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += lanes[l];
    for (int64_t j = n_vec; j < n; ++j) sum += load_acc<Acc>(yr[j]);
    const Acc mean = sum * inv_n;

    Acc sq[kLanes] = {};
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const Acc d = load_acc<Acc>(yr[j + l]) - mean;
        sq[l] += d * d;
      }
    }
    Acc var = 0;
    for (int l = 0; l < kLanes; ++l) var += sq[l];
    for (int64_t j = n_vec; j < n; ++j) {
      const Acc d = load_acc<Acc>(yr[j]) - mean;
      var += d * d;
    }
    const Acc rstd = Acc(1) / std::sqrt(var * inv_n + eps);
    for (int64_t j = 0; j < n; ++j) {
      orow[j] = store_as<O>((load_acc<Acc>(yr[j]) - mean) * rstd * gamma[j] + beta[j]);
    }
    if (mean_out != nullptr) {
      mean_out[i] = mean;
      rstd_out[i] = rstd;
    }
  }
}

// ---- backward rows ------------------------------------------------------------------------------

// For rows [0, rows): xhat = (y - mean) * rstd, gg = grad * gamma,
// dy = rstd * (gg - mean(gg) - xhat * mean(gg * xhat)) into dy (grad in x's dtype T; y and dy in
// the GEMM dtype D), and the column
// sums part[0] += grad * xhat (dln_weight), part[1] += grad (dln_bias), part[2] += dy (dbias).
// gg is kept in the scratch row ([n]) between the two passes: its stored (rounded) value is what
// mean(gg) summed, so where the row's terms cancel exactly (one feature: gg - mean(gg) = 0) they
// still do (recomputing grad * gamma would let the compiler fuse it into an FMA with the
// subtraction and leave the product's rounding error, times rstd).
// The buffers never overlap: __restrict__ lets the loops vectorize without runtime alias checks.
template <typename T, typename D, typename Acc>
ROSITA_ALWAYS_INLINE void ln_bwd_rows_body(const T* __restrict__ g, const D* __restrict__ y,
                                           const Acc* __restrict__ mean,
                                           const Acc* __restrict__ rstd,
                                           const Acc* __restrict__ gamma, D* __restrict__ dy,
                                           Acc* __restrict__ part, Acc* __restrict__ scratch,
                                           int64_t rows, int64_t n) {
  Acc* __restrict__ dgamma = part;
  Acc* __restrict__ dbeta = part + n;
  Acc* __restrict__ dbias = part + 2 * n;
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const int64_t n_vec = n / kLanes * kLanes;
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict__ gr = g + i * n;
    const D* __restrict__ yr = y + i * n;
    D* __restrict__ dr = dy + i * n;
    const Acc mu = mean[i], rs = rstd[i];
    Acc la[kLanes] = {}, lb[kLanes] = {};
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const Acc gv = load_acc<Acc>(gr[j + l]);
        const Acc xh = (load_acc<Acc>(yr[j + l]) - mu) * rs;
        const Acc gg = gv * gamma[j + l];
        scratch[j + l] = gg;
        la[l] += gg;
        lb[l] += gg * xh;
        dgamma[j + l] += gv * xh;
        dbeta[j + l] += gv;
      }
    }
    Acc a = 0, b = 0;
    for (int l = 0; l < kLanes; ++l) {
      a += la[l];
      b += lb[l];
    }
    for (int64_t j = n_vec; j < n; ++j) {
      const Acc gv = load_acc<Acc>(gr[j]);
      const Acc xh = (load_acc<Acc>(yr[j]) - mu) * rs;
      const Acc gg = gv * gamma[j];
      scratch[j] = gg;
      a += gg;
      b += gg * xh;
      dgamma[j] += gv * xh;
      dbeta[j] += gv;
    }
    a *= inv_n;
    b *= inv_n;
    for (int64_t j = 0; j < n; ++j) {
      const Acc xh = (load_acc<Acc>(yr[j]) - mu) * rs;
      const Acc d = rs * ((scratch[j] - a) - xh * b);
      dr[j] = store_as<D>(d);
      dbias[j] += d;
    }
  }
}

template <typename Y, typename O, typename Acc>
void ln_rows_base(const Y* y, O* out, const Acc* gamma, const Acc* beta, int64_t rows, int64_t n,
                  Acc eps, Acc* mean_out, Acc* rstd_out) {
  ln_rows_body(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
}
template <typename T, typename D, typename Acc>
void ln_bwd_rows_base(const T* g, const D* y, const Acc* mean, const Acc* rstd, const Acc* gamma,
                      D* dy, Acc* part, Acc* scratch, int64_t rows, int64_t n) {
  ln_bwd_rows_body(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
}
#ifdef ROSITA_X86_DISPATCH
template <typename Y, typename O, typename Acc>
ROSITA_AVX2 void ln_rows_avx2(const Y* y, O* out, const Acc* gamma, const Acc* beta, int64_t rows,
                              int64_t n, Acc eps, Acc* mean_out, Acc* rstd_out) {
  ln_rows_body(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
}
template <typename T, typename D, typename Acc>
ROSITA_AVX2 void ln_bwd_rows_avx2(const T* g, const D* y, const Acc* mean, const Acc* rstd,
                                  const Acc* gamma, D* dy, Acc* part, Acc* scratch, int64_t rows,
                                  int64_t n) {
  ln_bwd_rows_body(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
}
template <typename Y, typename O, typename Acc>
ROSITA_AVX512 void ln_rows_avx512(const Y* y, O* out, const Acc* gamma, const Acc* beta,
                                  int64_t rows, int64_t n, Acc eps, Acc* mean_out, Acc* rstd_out) {
  ln_rows_body(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
}
template <typename T, typename D, typename Acc>
ROSITA_AVX512 void ln_bwd_rows_avx512(const T* g, const D* y, const Acc* mean, const Acc* rstd,
                                      const Acc* gamma, D* dy, Acc* part, Acc* scratch,
                                      int64_t rows, int64_t n) {
  ln_bwd_rows_body(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
}
#endif

template <typename Y, typename O, typename Acc>
void ln_rows(const Y* y, O* out, const Acc* gamma, const Acc* beta, int64_t rows, int64_t n,
             Acc eps, Acc* mean_out, Acc* rstd_out) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512:
      return ln_rows_avx512(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
    case Isa::Avx2: return ln_rows_avx2(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
    default: break;
  }
#endif
  ln_rows_base(y, out, gamma, beta, rows, n, eps, mean_out, rstd_out);
}

template <typename T, typename D, typename Acc>
void ln_bwd_rows(const T* g, const D* y, const Acc* mean, const Acc* rstd, const Acc* gamma, D* dy,
                 Acc* part, Acc* scratch, int64_t rows, int64_t n) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512:
      return ln_bwd_rows_avx512(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
    case Isa::Avx2: return ln_bwd_rows_avx2(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
    default: break;
  }
#endif
  ln_bwd_rows_base(g, y, mean, rstd, gamma, dy, part, scratch, rows, n);
}

// ---- passes -------------------------------------------------------------------------------------

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Row grain: enough elements per task to be worth a thread.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, n)); }

// out = LayerNorm(y) row by row ([m, n] contiguous; out may be y); mean/rstd ([m], accumulation
// dtype) receive the statistics when defined.
void ln_forward_pass(const at::Tensor& y, const at::Tensor& out, const at::Tensor& gamma,
                     const at::Tensor& beta, double eps, const at::Tensor& mean,
                     const at::Tensor& rstd) {
  const int64_t m = y.size(0), n = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lrln_fwd", [&] {
    // y is in the GEMM dtype: out's, fp32 for an fp16 out.
    using O = scalar_t;
    using Y = std::conditional_t<std::is_same_v<O, c10::Half>, float, O>;
    using Acc = acc_of<Y>;
    TORCH_INTERNAL_ASSERT(y.scalar_type() == c10::CppTypeToScalarType<Y>::value);
    const Y* yp = y.const_data_ptr<Y>();
    O* op = out.mutable_data_ptr<O>();
    const Acc* gp = gamma.const_data_ptr<Acc>();
    const Acc* bp = beta.const_data_ptr<Acc>();
    Acc* mp = mean.defined() ? mean.mutable_data_ptr<Acc>() : nullptr;
    Acc* rp = rstd.defined() ? rstd.mutable_data_ptr<Acc>() : nullptr;
    at::parallel_for(0, m, row_grain(n), [&](int64_t r0, int64_t r1) {
      ln_rows(yp + r0 * n, op + r0 * n, gp, bp, r1 - r0, n, static_cast<Acc>(eps),
              mp ? mp + r0 : nullptr, rp ? rp + r0 : nullptr);
    });
  });
}

// dy from grad (x's dtype) and y (the GEMM dtype, as dy; [m, n] contiguous), mean and rstd; returns the
// [3, n] column sums (dln_weight, dln_bias, dbias) in the accumulation dtype. Rows are split in
// one chunk per thread, each summing into its own [3, n] block, so the sums do not depend on
// scheduling.
at::Tensor ln_backward_pass(const at::Tensor& g, const at::Tensor& y, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& gamma, const at::Tensor& dy) {
  const int64_t m = g.size(0), n = g.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = row_grain(n);
  const int64_t chunks = std::max<int64_t>(1, std::min(threads, (m + grain - 1) / grain));
  const int64_t rows_per = std::max<int64_t>(1, (m + chunks - 1) / chunks);
  auto partial = at::zeros({chunks, 3, n}, g.options().dtype(acc_type(g.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "lrln_bwd", [&] {
    using T = scalar_t;
    using Acc = acc_of<T>;
    const T* gp = g.const_data_ptr<T>();
    const Acc* mp = mean.const_data_ptr<Acc>();
    const Acc* rp = rstd.const_data_ptr<Acc>();
    const Acc* gam = gamma.const_data_ptr<Acc>();
    Acc* pp = partial.mutable_data_ptr<Acc>();
    auto run = [&](auto* dyp) {
      using D = std::remove_pointer_t<decltype(dyp)>;
      const D* yp = y.const_data_ptr<D>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<Acc> scratch(static_cast<size_t>(n));
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * rows_per, rows = std::min(rows_per, m - r0);
          if (rows <= 0) continue;
          ln_bwd_rows(gp + r0 * n, yp + r0 * n, mp + r0, rp + r0, gam, dyp + r0 * n,
                      pp + c * 3 * n, scratch.data(), rows, n);
        }
      });
    };
    TORCH_INTERNAL_ASSERT(y.scalar_type() == dy.scalar_type());
    if (dy.scalar_type() == g.scalar_type()) {
      run(dy.mutable_data_ptr<T>());
    } else {
      TORCH_INTERNAL_ASSERT(dy.scalar_type() == at::kFloat);
      run(dy.mutable_data_ptr<float>());
    }
  });
  return partial.sum(0);
}

// ---- entry points -------------------------------------------------------------------------------

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& ln_weight,
                  const at::Tensor& ln_bias, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && ln_weight.device().is_cpu() &&
                  ln_bias.device().is_cpu(),
              "rosita_fast linear_residual_layernorm (cpp): tensors must be on the CPU");
  TORCH_CHECK(weight.dim() == 2, "linear_residual_layernorm: weight must be 2-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
              "linear_residual_layernorm: x.shape[-1] must equal weight.shape[1]");
  const auto t = x.scalar_type();
  const int64_t n = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == t && ln_weight.scalar_type() == t &&
                  ln_bias.scalar_type() == t,
              "linear_residual_layernorm: all tensors must share x's dtype");
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == n && ln_bias.dim() == 1 &&
                  ln_bias.size(0) == n,
              "linear_residual_layernorm: ln_weight and ln_bias must have shape [out_features]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == t &&
                    bias->device().is_cpu(),
                "linear_residual_layernorm: bias must be a CPU [out_features] tensor of x's dtype");
  }
  TORCH_CHECK(eps >= 0, "linear_residual_layernorm: eps must be >= 0");
}

void check_residual(const at::Tensor& x, const at::Tensor& residual, int64_t n) {
  TORCH_CHECK(residual.device().is_cpu() && residual.scalar_type() == x.scalar_type(),
              "linear_residual_layernorm: residual must be a CPU tensor of x's dtype");
  auto shape = x.sizes().vec();
  shape.back() = n;
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(shape),
              "linear_residual_layernorm: residual must have shape ", at::IntArrayRef(shape));
}

// [..., K] -> [M, K] with unit stride along K (oneDNN takes any row stride).
at::Tensor flatten_rows(const at::Tensor& x) {
  auto x2d = x.reshape({-1, x.size(-1)});
  const bool ok = x2d.stride(1) == 1 && (x2d.size(0) <= 1 || x2d.stride(0) >= x2d.size(1));
  return ok ? x2d : x2d.contiguous();
}

// y = x2d @ W^T + b + residual ([m, n], the GEMM dtype, contiguous). oneDNN fuses the add; a
// packed weight is used when oneDNN runs the product (onednn::prefer: not for fp64, nor for small
// fp32 products, which take at::addmm and an add).
at::Tensor pre_norm(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                    const at::Tensor* packed) {
  const auto gdt = onednn::gemm_dtype(x.scalar_type());
  const int64_t n = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  const int64_t m = xg.size(0), k = xg.size(1);
  const auto res = residual.detach().reshape({m, n}).to(gdt);
  const auto bg = bias.has_value() ? std::optional<at::Tensor>(bias->detach().to(gdt).contiguous())
                                   : std::nullopt;
  if (onednn::prefer(gdt, m, n, k, packed != nullptr)) {
    return onednn::linear_add(xg, res, packed != nullptr ? *packed : weight.detach().to(gdt), bg);
  }
  const auto wg = weight.detach().to(gdt);
  auto y = bg.has_value() ? at::addmm(*bg, xg, wg.t()) : at::mm(xg, wg.t());
  return y.add_(res);
}

// y = dropout(x2d @ W^T + b) + residual ([m, n], the GEMM dtype, contiguous): the GEMM with the
// bias only, then the mask, scale and residual add in place, row by row.
at::Tensor pre_norm_dropout(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            double p, int64_t seed) {
  const auto gdt = onednn::gemm_dtype(x.scalar_type());
  const int64_t n = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  const int64_t m = xg.size(0), k = xg.size(1);
  const auto res = residual.detach().reshape({m, n}).to(gdt).contiguous();
  const auto bg = bias.has_value() ? std::optional<at::Tensor>(bias->detach().to(gdt).contiguous())
                                   : std::nullopt;
  const auto wg = weight.detach().to(gdt);
  at::Tensor z;
  if (onednn::prefer(gdt, m, n, k, false)) {
    z = onednn::linear_pointwise(xg, wg, bg);
  } else {
    z = bg.has_value() ? at::addmm(*bg, xg, wg.t()) : at::mm(xg, wg.t());
  }
  z = z.contiguous();
  const uint32_t thr = dropout::threshold(p);
  const uint32_t s32 = static_cast<uint32_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gdt, "lrln_dropout_fwd", [&] {
    using Acc = acc_of<scalar_t>;
    const Acc sc = static_cast<Acc>(dropout::scale(p));
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    at::parallel_for(0, m, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const uint32_t key = dropout::row_key(s32, i);
        scalar_t* zr = zp + i * n;
        const scalar_t* rr = rp + i * n;
        for (int64_t j = 0; j < n; ++j) {
          const Acc f = dropout::keep(key, j, thr) ? sc : Acc(0);
          zr[j] = store_as<scalar_t>(load_acc<Acc>(zr[j]) * f + load_acc<Acc>(rr[j]));
        }
      }
    });
  });
  return z;
}

// dz = dy * mask * scale ([m, n], dy's dtype): the dense output's gradient under dropout.
at::Tensor dropout_grad(const at::Tensor& dy, double p, int64_t seed) {
  const int64_t m = dy.size(0), n = dy.size(1);
  auto dz = empty_output({m, n}, dy.options());
  const uint32_t thr = dropout::threshold(p);
  const uint32_t s32 = static_cast<uint32_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dy.scalar_type(), "lrln_dropout_bwd", [&] {
    using Acc = acc_of<scalar_t>;
    const Acc sc = static_cast<Acc>(dropout::scale(p));
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, m, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const uint32_t key = dropout::row_key(s32, i);
        for (int64_t j = 0; j < n; ++j) {
          const Acc f = dropout::keep(key, j, thr) ? sc : Acc(0);
          dp[i * n + j] = store_as<scalar_t>(load_acc<Acc>(gp[i * n + j]) * f);
        }
      }
    });
  });
  return dz;
}

void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "linear_residual_layernorm: dropout_p must be in [0, 1)");
}

at::Tensor acc_param(const at::Tensor& p) {
  return p.detach().to(acc_type(p.scalar_type())).contiguous();
}

#define ROSITA_KERNEL_GUARDS                                   \
  const at::AutoDispatchBelowADInplaceOrView no_autograd;      \
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset)

at::Tensor lrln_fwd(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                    const std::optional<at::Tensor>& packed) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, ln_weight, ln_bias, eps);
  check_residual(x, residual, weight.size(0));
  const auto dtype = x.scalar_type();
  const auto gdt = onednn::gemm_dtype(dtype);
  const bool has_packed = packed.has_value() && packed->defined();
  if (has_packed) {
    TORCH_CHECK(packed->is_mkldnn() && packed->scalar_type() == gdt &&
                    packed->sizes() == weight.sizes(),
                "linear_residual_layernorm: packed must be the oneDNN-packed form of weight "
                "(rosita_fast.ops.pack_linear_weight)");
  }
  auto y = pre_norm(x, weight, bias, residual, has_packed ? &*packed : nullptr);
  // Inference normalizes in place; fp16 (products in fp32) writes a new fp16 output.
  auto out = gdt == dtype ? y : empty_output(y.sizes(), x.options());
  ln_forward_pass(y, out, acc_param(ln_weight), acc_param(ln_bias), eps, at::Tensor(),
                  at::Tensor());
  return out.view(residual.sizes());
}

// Training forward: (out, y, mean, rstd) with y = dropout(x W^T + b) + residual as [rows, n] in
// the GEMM dtype (x's; fp32 for fp16: what the product gave, as inference normalizes) and mean,
// rstd [rows] in fp32 (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrln_train_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    double eps, double dropout_p, int64_t seed) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, ln_weight, ln_bias, eps);
  check_residual(x, residual, weight.size(0));
  check_dropout(dropout_p);
  const auto dtype = x.scalar_type();
  auto y = dropout_p > 0 ? pre_norm_dropout(x, weight, bias, residual, dropout_p, seed)
                         : pre_norm(x, weight, bias, residual, nullptr);
  const int64_t m = y.size(0);
  auto out = empty_output(y.sizes(), x.options());
  const auto stat_opts = x.options().dtype(acc_type(dtype));
  auto mean = empty_output({m}, stat_opts);
  auto rstd = empty_output({m}, stat_opts);
  ln_forward_pass(y, out, acc_param(ln_weight), acc_param(ln_bias), eps, mean, rstd);
  return {out.view(residual.sizes()), y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrln_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
    const std::optional<at::Tensor>& y_saved, const std::optional<at::Tensor>& mean_saved,
    const std::optional<at::Tensor>& rstd_saved, double dropout_p, int64_t seed) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, ln_weight, ln_bias, eps);
  check_dropout(dropout_p);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(),
              "linear_residual_layernorm backward: grad dtype must match x");
  const auto dtype = x.scalar_type();
  const auto gdt = onednn::gemm_dtype(dtype);
  const auto acc = acc_type(dtype);
  const int64_t n = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  const int64_t m = xg.size(0);
  const auto g2d = grad.detach().reshape({-1, n}).contiguous();
  TORCH_CHECK(g2d.size(0) == m, "linear_residual_layernorm backward: grad has the wrong shape");

  at::Tensor y, mean, rstd;
  const bool kept = y_saved.has_value() && y_saved->defined() && mean_saved.has_value() &&
                    mean_saved->defined() && rstd_saved.has_value() && rstd_saved->defined();
  if (kept) {
    TORCH_CHECK(y_saved->numel() == m * n && mean_saved->numel() == m && rstd_saved->numel() == m,
                "linear_residual_layernorm backward: y must be [rows, n], mean and rstd [rows]");
    y = y_saved->detach().reshape({m, n}).to(gdt).contiguous();
    mean = mean_saved->detach().reshape({m}).to(acc).contiguous();
    rstd = rstd_saved->detach().reshape({m}).to(acc).contiguous();
  } else {  // not kept by the forward: recompute y and the statistics
    TORCH_CHECK(residual.has_value() && residual->defined(),
                "linear_residual_layernorm backward: needs either y, mean and rstd or residual");
    check_residual(x, *residual, n);
    y = dropout_p > 0 ? pre_norm_dropout(x, weight, bias, *residual, dropout_p, seed)
                      : pre_norm(x, weight, bias, *residual, nullptr);
    auto scratch = empty_output(y.sizes(), y.options());
    mean = empty_output({m}, x.options().dtype(acc));
    rstd = empty_output({m}, x.options().dtype(acc));
    ln_forward_pass(y, scratch, acc_param(ln_weight), acc_param(ln_bias), eps, mean, rstd);
  }

  auto dy = empty_output({m, n}, x.options().dtype(gdt));
  const auto sums = ln_backward_pass(g2d, y, mean, rstd, acc_param(ln_weight), dy);
  const auto wg = weight.detach().to(gdt);
  // Under dropout the GEMMs and dbias take the dense output's gradient, dresidual keeps dy.
  const auto dz = dropout_p > 0 ? dropout_grad(dy, dropout_p, seed) : dy;
  auto dx = onednn::mm_nt(dz, wg.t()).to(dtype).view(x.sizes());
  auto dw = onednn::mm_nt(dz.t(), xg.t()).to(dtype);
  // sums is one [3, n] buffer: each gradient gets its own copy (outputs must not alias).
  auto column = [&](int64_t i) { return sums[i].to(dtype, /*non_blocking=*/false, /*copy=*/true); };
  at::Tensor db = at::empty({0}, x.options());
  if (bias.has_value()) {
    db = dropout_p > 0 ? at::sum(dz, {0}, false, acc).to(dtype) : column(2);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto dres = dy.to(dtype).view(out_shape);
  return {dx, dw, db, dres, column(0), column(1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def(
      "linear_residual_layernorm_cpp(Tensor x, Tensor weight, Tensor? bias, Tensor residual, "
      "Tensor ln_weight, Tensor ln_bias, float eps, Tensor? packed=None) -> Tensor");
  m.def(
      "linear_residual_layernorm_train_cpp(Tensor x, Tensor weight, Tensor? bias, Tensor residual, "
      "Tensor ln_weight, Tensor ln_bias, float eps, float dropout_p=0.0, int seed=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_residual_layernorm_backward_cpp(Tensor grad, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor? residual, Tensor ln_weight, Tensor ln_bias, float eps, Tensor? y=None, "
      "Tensor? mean=None, Tensor? rstd=None, float dropout_p=0.0, int seed=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("linear_residual_layernorm_cpp", &lrln_fwd);
  m.impl("linear_residual_layernorm_train_cpp", &lrln_train_fwd);
  m.impl("linear_residual_layernorm_backward_cpp", &lrln_bwd);
}

// A prepacked weight is an MKLDNN-layout tensor: a call that passes one dispatches on MkldnnCPU.
TORCH_LIBRARY_IMPL(rosita_fast, MkldnnCPU, m) {
  m.impl("linear_residual_layernorm_cpp", &lrln_fwd);
}

}  // namespace rosita_fast
