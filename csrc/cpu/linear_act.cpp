// C++ CPU kernels for the dense linear layer with a fused activation: y = act(x @ W^T + b).
//
// Forward (inference): one oneDNN inner product with bias and activation in its epilogue
// (rosita_fast/onednn_linear.h: ~2x torch's default fp32 GEMM on the AMD machines; an optional
// prepacked weight saves the per-call weight reorder). Training forward: the same product without
// the activation gives z = x W^T + b (kept for the backward), and one pass over z, parallel over
// threads, writes act(z). Backward: one pass dz = grad * act'(z) that also sums the bias gradient
// per thread while each row is in cache, then dX = dz W and dW = dz^T X (onednn::mm_nt: transposed
// views, no copies). fp16 runs its products in fp32, fp64 goes to at::addmm/at::mm (see the header).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <type_traits>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/epilogue.h"
#include "rosita_fast/onednn_linear.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

// Smallest amount of elementwise work (elements) worth a thread of its own.
constexpr int64_t kMinTaskElems = 1 << 14;

template <typename T> using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- row passes ---------------------------------------------------------------------------------
// The activation is a template parameter so each loop is straight-line code the compiler
// vectorizes.

// out[j] = act(z[j]) for count contiguous elements (out may be z).
template <Activation A, typename Z, typename O>
ROSITA_ALWAYS_INLINE void act_span_t(const Z* z, O* out, int64_t count) {
  using Acc = acc_of<Z>;
  for (int64_t j = 0; j < count; ++j) out[j] = store_as<O>(act_forward_t<A, Acc>(load_acc<Acc>(z[j])));
}

template <typename Z, typename O>
ROSITA_ALWAYS_INLINE void act_span_body(const Z* z, O* out, int64_t count, Activation a) {
  switch (a) {
    case Activation::ReLU: return act_span_t<Activation::ReLU>(z, out, count);
    case Activation::Gelu: return act_span_t<Activation::Gelu>(z, out, count);
    case Activation::GeluTanh: return act_span_t<Activation::GeluTanh>(z, out, count);
    default: return act_span_t<Activation::None>(z, out, count);
  }
}

// dz = grad * act'(z) for rows x n contiguous elements (grad in x's dtype T, z and dz in the GEMM
// dtype D); db[j] += dz[i, j] when db is given.
// The buffers never overlap: __restrict__ lets the loops vectorize without runtime alias checks
// (with four pointers GCC otherwise leaves them scalar).
template <Activation A, typename T, typename D>
ROSITA_ALWAYS_INLINE void act_grad_rows_t(const T* __restrict__ g, const D* __restrict__ z,
                                          D* __restrict__ dz, acc_of<T>* __restrict__ db,
                                          int64_t rows, int64_t n) {
  using Acc = acc_of<T>;
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict__ gr = g + i * n;
    const D* __restrict__ zr = z + i * n;
    D* __restrict__ dr = dz + i * n;
    if (db != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        const Acc d = load_acc<Acc>(gr[j]) * act_grad_t<A, Acc>(load_acc<Acc>(zr[j]));
        dr[j] = store_as<D>(d);
        db[j] += d;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        dr[j] = store_as<D>(load_acc<Acc>(gr[j]) * act_grad_t<A, Acc>(load_acc<Acc>(zr[j])));
      }
    }
  }
}

template <typename T, typename D>
ROSITA_ALWAYS_INLINE void act_grad_body(const T* g, const D* z, D* dz, acc_of<T>* db, int64_t rows,
                                        int64_t n, Activation a) {
  switch (a) {
    case Activation::ReLU: return act_grad_rows_t<Activation::ReLU>(g, z, dz, db, rows, n);
    case Activation::Gelu: return act_grad_rows_t<Activation::Gelu>(g, z, dz, db, rows, n);
    case Activation::GeluTanh:
      return act_grad_rows_t<Activation::GeluTanh>(g, z, dz, db, rows, n);
    default: return act_grad_rows_t<Activation::None>(g, z, dz, db, rows, n);
  }
}

template <typename Z, typename O>
void act_span_base(const Z* z, O* out, int64_t count, Activation a) {
  act_span_body(z, out, count, a);
}
template <typename T, typename D>
void act_grad_base(const T* g, const D* z, D* dz, acc_of<T>* db, int64_t rows, int64_t n,
                   Activation a) {
  act_grad_body(g, z, dz, db, rows, n, a);
}
#ifdef ROSITA_X86_DISPATCH
template <typename Z, typename O>
ROSITA_AVX2 void act_span_avx2(const Z* z, O* out, int64_t count, Activation a) {
  act_span_body(z, out, count, a);
}
template <typename T, typename D>
ROSITA_AVX2 void act_grad_avx2(const T* g, const D* z, D* dz, acc_of<T>* db, int64_t rows,
                               int64_t n, Activation a) {
  act_grad_body(g, z, dz, db, rows, n, a);
}
template <typename Z, typename O>
ROSITA_AVX512 void act_span_avx512(const Z* z, O* out, int64_t count, Activation a) {
  act_span_body(z, out, count, a);
}
template <typename T, typename D>
ROSITA_AVX512 void act_grad_avx512(const T* g, const D* z, D* dz, acc_of<T>* db, int64_t rows,
                                   int64_t n, Activation a) {
  act_grad_body(g, z, dz, db, rows, n, a);
}
#endif

template <typename Z, typename O>
void act_span(const Z* z, O* out, int64_t count, Activation a) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512: return act_span_avx512(z, out, count, a);
    case Isa::Avx2: return act_span_avx2(z, out, count, a);
    default: break;
  }
#endif
  act_span_base(z, out, count, a);
}

template <typename T, typename D>
void act_grad_span(const T* g, const D* z, D* dz, acc_of<T>* db, int64_t rows, int64_t n,
                   Activation a) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512: return act_grad_avx512(g, z, dz, db, rows, n, a);
    case Isa::Avx2: return act_grad_avx2(g, z, dz, db, rows, n, a);
    default: break;
  }
#endif
  act_grad_base(g, z, dz, db, rows, n, a);
}

// out = act(z) elementwise over two contiguous tensors of the same size (out may be z), parallel.
// z is in the GEMM dtype: out's, fp32 for an fp16 out.
void act_pass(const at::Tensor& z, const at::Tensor& out, Activation a) {
  const int64_t count = z.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_act_act", [&] {
    using O = scalar_t;
    using Z = std::conditional_t<std::is_same_v<O, c10::Half>, float, O>;
    TORCH_INTERNAL_ASSERT(z.scalar_type() == c10::CppTypeToScalarType<Z>::value);
    const Z* zp = z.const_data_ptr<Z>();
    O* op = out.mutable_data_ptr<O>();
    at::parallel_for(0, count, kMinTaskElems, [&](int64_t b, int64_t e) {
      act_span(zp + b, op + b, e - b, a);
    });
  });
}

// dz = grad * act'(z) (grad [m, n] contiguous in x's dtype; z and dz in the GEMM dtype), in row
// chunks, one per thread; returns the column sums of dz (the bias gradient, accumulation dtype)
// when want_db. Each chunk sums into its own row of a [chunks, n] buffer, so the result does not
// depend on thread scheduling.
at::Tensor act_grad_pass(const at::Tensor& g, const at::Tensor& z, const at::Tensor& dz,
                         Activation a, bool want_db) {
  const int64_t m = g.size(0), n = g.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_rows = std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, n));
  const int64_t chunks = std::max<int64_t>(1, std::min(threads, (m + min_rows - 1) / min_rows));
  const int64_t rows_per = std::max<int64_t>(1, (m + chunks - 1) / chunks);
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = want_db ? at::zeros({chunks, n}, g.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_act_bwd_pass",
                                  [&] {
    using T = scalar_t;
    using Acc = acc_of<T>;
    const T* gp = g.const_data_ptr<T>();
    Acc* pp = want_db ? partial.mutable_data_ptr<Acc>() : nullptr;
    auto run = [&](auto* dzp) {
      using D = std::remove_pointer_t<decltype(dzp)>;
      const D* zp = z.const_data_ptr<D>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * rows_per, rows = std::min(rows_per, m - r0);
          if (rows <= 0) continue;
          act_grad_span(gp + r0 * n, zp + r0 * n, dzp + r0 * n, pp ? pp + c * n : nullptr, rows, n,
                        a);
        }
      });
    };
    TORCH_INTERNAL_ASSERT(z.scalar_type() == dz.scalar_type());
    if (dz.scalar_type() == g.scalar_type()) {
      run(dz.mutable_data_ptr<T>());
    } else {
      TORCH_INTERNAL_ASSERT(dz.scalar_type() == at::kFloat);
      run(dz.mutable_data_ptr<float>());
    }
  });
  return want_db ? partial.sum(0) : at::Tensor();
}

// ---- products -----------------------------------------------------------------------------------

struct DnnAttr {
  std::string_view attr, algorithm;
};

// The activations oneDNN fuses. Not ReLU: oneDNN's ReLU maps NaN to 0 where torch.relu keeps it
// (a NaN input must poison its output row), so ReLU runs as a pass over the product's output
// (measured: the same time as the fused form, 5.1 ms at 1024 x 768 x 768 fp32).
DnnAttr dnn_attr(Activation a) {
  switch (a) {
    case Activation::Gelu: return {"gelu", "none"};
    case Activation::GeluTanh: return {"gelu", "tanh"};
    default: return {"none", ""};
  }
}

struct Product {
  at::Tensor y;     // [m, n] in the GEMM dtype, contiguous
  bool act_applied;  // whether the activation is already in y
};

// x2d @ W^T + b in the GEMM dtype gdt (xg and bg already in it; the weight is converted here
// only if it is used), with the activation fused when fuse_act and oneDNN runs the product
// (onednn::prefer: not for fp64, nor for small fp32 products). A packed weight is used when oneDNN
// runs the product.
Product product(const at::Tensor& xg, const at::Tensor& weight, const at::Tensor* packed,
                const std::optional<at::Tensor>& bg, Activation act, bool fuse_act) {
  const auto gdt = xg.scalar_type();
  const int64_t m = xg.size(0), k = xg.size(1), n = weight.size(0);
  if (onednn::prefer(gdt, m, n, k, packed != nullptr)) {
    const auto d = fuse_act ? dnn_attr(act) : DnnAttr{"none", ""};
    const auto& w = packed != nullptr ? *packed : weight.to(gdt);
    return {onednn::linear_pointwise(xg, w, bg, d.attr, d.algorithm), d.attr != "none"};
  }
  const auto wg = weight.to(gdt);
  return {bg.has_value() ? at::addmm(*bg, xg, wg.t()) : at::mm(xg, wg.t()), false};
}

// ---- entry points -------------------------------------------------------------------------------

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "rosita_fast linear_act (cpp): x and weight must be CPU tensors");
  TORCH_CHECK(weight.dim() == 2, "linear_act: weight must be 2-D [out_features, in_features]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "linear_act: x.shape[-1] (",
              x.dim() >= 1 ? x.size(-1) : -1, ") must equal weight.shape[1] (", weight.size(1), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "linear_act: x and weight must share a dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "linear_act: bias must have shape [out_features]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "linear_act: bias dtype must match x");
    TORCH_CHECK(bias->device().is_cpu(), "linear_act: bias must be a CPU tensor");
  }
  TORCH_CHECK(activation >= 0 && activation <= 3, "linear_act: unknown activation code ",
              activation);
}

void check_packed(const at::Tensor& packed, const at::Tensor& weight, at::ScalarType gdt) {
  TORCH_CHECK(packed.is_mkldnn(),
              "linear_act: packed must be a oneDNN-packed weight (rosita_fast.ops.pack_linear_weight)");
  TORCH_CHECK(packed.scalar_type() == gdt && packed.sizes() == weight.sizes(),
              "linear_act: packed is ", packed.scalar_type(), " ", packed.sizes(),
              "; expected the packed form of the weight: ", gdt, " ", weight.sizes());
}

// [..., K] -> [M, K] with unit stride along K (oneDNN takes any row stride).
at::Tensor flatten_rows(const at::Tensor& x) {
  auto x2d = x.reshape({-1, x.size(-1)});
  const bool ok = x2d.stride(1) == 1 && (x2d.size(0) <= 1 || x2d.stride(0) >= x2d.size(1));
  return ok ? x2d : x2d.contiguous();
}

std::optional<at::Tensor> bias_in(const std::optional<at::Tensor>& bias, at::ScalarType gdt) {
  if (!bias.has_value()) return std::nullopt;
  return bias->detach().to(gdt).contiguous();
}

// Kernels compute; autograd is the op's business (rosita_fast/ops/linear_act.py). Inputs arrive
// already cast by the op's autocast rule, so the products below must not be recast.
#define ROSITA_KERNEL_GUARDS                                   \
  const at::AutoDispatchBelowADInplaceOrView no_autograd;      \
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset)

at::Tensor linear_act_fwd(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t activation,
                          const std::optional<at::Tensor>& packed) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, activation);
  const auto act = static_cast<Activation>(activation);
  const auto dtype = x.scalar_type();
  const auto gdt = onednn::gemm_dtype(dtype);
  const bool has_packed = packed.has_value() && packed->defined();
  if (has_packed) check_packed(*packed, weight, gdt);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  auto [y, done] = product(xg, weight.detach(), has_packed ? &*packed : nullptr,
                           bias_in(bias, gdt), act, /*fuse_act=*/true);
  if (!done && act != Activation::None) act_pass(y, y, act);
  return (gdt == dtype ? y : y.to(dtype)).view(out_shape);
}

// Training forward: (act(z), z) with z = x W^T + b as [rows, out_features] in the GEMM dtype (x's;
// fp32 for fp16): what the product gave, with no further rounding.
std::tuple<at::Tensor, at::Tensor> linear_act_train_fwd(const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        int64_t activation) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, activation);
  const auto act = static_cast<Activation>(activation);
  const auto dtype = x.scalar_type();
  const auto gdt = onednn::gemm_dtype(dtype);
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  auto z = product(xg, weight.detach(), nullptr, bias_in(bias, gdt), act, /*fuse_act=*/false).y;
  auto out = empty_output(z.sizes(), x.options().dtype(dtype));
  act_pass(z, out, act);
  return {out.view(out_shape), z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t activation, const std::optional<at::Tensor>& z) {
  ROSITA_KERNEL_GUARDS;
  check_inputs(x, weight, bias, activation);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "linear_act backward: grad dtype must match x");
  const auto act = static_cast<Activation>(activation);
  const auto dtype = x.scalar_type();
  const auto gdt = onednn::gemm_dtype(dtype);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = weight.size(0);
  const auto xg = flatten_rows(x.detach()).to(gdt);
  const int64_t m = xg.size(0);
  const auto g2d = grad.detach().reshape({-1, n}).contiguous();
  TORCH_CHECK(g2d.size(0) == m, "linear_act backward: grad has the wrong shape");

  at::Tensor dz, db;
  if (act == Activation::None) {
    dz = g2d.to(gdt);
    if (bias.has_value()) db = at::sum(dz, {0}, false, acc);
  } else {
    at::Tensor zt;
    if (z.has_value() && z->defined()) {
      TORCH_CHECK(z->numel() == m * n, "linear_act backward: z must be [rows, out_features]");
      zt = z->detach().reshape({m, n}).to(gdt).contiguous();
    } else {  // not kept by the forward: recompute
      zt = product(xg, weight.detach(), nullptr, bias_in(bias, gdt), act, false).y;
    }
    dz = empty_output({m, n}, x.options().dtype(gdt));
    db = act_grad_pass(g2d, zt, dz, act, bias.has_value());
  }
  const auto wg = weight.detach().to(gdt);
  auto dx = onednn::mm_nt(dz, wg.t()).to(dtype).view(x.sizes());
  auto dw = onednn::mm_nt(dz.t(), xg.t()).to(weight.scalar_type());
  db = bias.has_value() ? db.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def(
      "linear_act_cpp(Tensor x, Tensor weight, Tensor? bias, int activation, Tensor? packed=None) "
      "-> Tensor");
  m.def(
      "linear_act_train_cpp(Tensor x, Tensor weight, Tensor? bias, int activation) -> "
      "(Tensor, Tensor)");
  m.def(
      "linear_act_backward_cpp(Tensor grad, Tensor x, Tensor weight, Tensor? bias, int activation, "
      "Tensor? z=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("linear_act_cpp", &linear_act_fwd);
  m.impl("linear_act_train_cpp", &linear_act_train_fwd);
  m.impl("linear_act_backward_cpp", &linear_act_bwd);
}

// A prepacked weight is an MKLDNN-layout tensor: a call that passes one dispatches on MkldnnCPU.
TORCH_LIBRARY_IMPL(rosita_fast, MkldnnCPU, m) { m.impl("linear_act_cpp", &linear_act_fwd); }

}  // namespace rosita_fast
