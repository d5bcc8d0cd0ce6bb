// C++ CPU kernels for the fused low-rank linear layer: y = act(x @ v^T @ u^T + bias).
//
// Rows are processed in blocks small enough that a block's rank-r intermediate and its output rows
// stay in cache: the two block products go to the BLAS that torch links, and bias + activation are
// applied while the freshly written output block is still cache-resident. Blocks are distributed
// over threads with at::parallel_for (OpenMP); BLAS calls inside a parallel region run
// single-threaded, so there is no oversubscription.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/epilogue.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

constexpr int64_t kMaxBlockRows = 64;
// One output chunk of the forward (bytes): small enough to stay in L1/L2 through its epilogue.
constexpr int64_t kChunkBytes = 256 * 1024;
// Narrowest column group worth a thread of its own in the forward.
constexpr int64_t kMinGroupCols = 64;
// Budget for one output block of the backward (bytes): roughly half of a per-core L2.
constexpr int64_t kOutBlockBytes = 512 * 1024;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows per block: enough blocks to keep every thread busy, few enough rows that the output block
// fits the cache budget, and never more than kMaxBlockRows.
int64_t block_rows(int64_t m, int64_t n_out, int64_t elem_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (m + threads - 1) / threads;
  const int64_t cache_rows = std::max<int64_t>(8, kOutBlockBytes / std::max<int64_t>(1, n_out * elem_bytes));
  return std::max<int64_t>(1, std::min({kMaxBlockRows, per_thread, cache_rows}));
}

void check_inputs(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(x.device().is_cpu() && u.device().is_cpu() && v.device().is_cpu(),
              "rosita_fast lowrank_linear (cpp): x, u and v must be CPU tensors");
  TORCH_CHECK(u.dim() == 2 && v.dim() == 2, "lowrank_linear: u and v must be 2-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == v.size(1), "lowrank_linear: x.shape[-1] (", x.size(-1),
              ") must equal v.shape[1] (", v.size(1), ")");
  TORCH_CHECK(u.size(1) == v.size(0), "lowrank_linear: u.shape[1] (", u.size(1),
              ") must equal v.shape[0] (", v.size(0), ")");
  TORCH_CHECK(x.scalar_type() == u.scalar_type() && x.scalar_type() == v.scalar_type(),
              "lowrank_linear: x, u and v must share a dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == u.size(0),
                "lowrank_linear: bias must have shape [out_features]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lowrank_linear: bias dtype must match x");
    TORCH_CHECK(bias->device().is_cpu(), "lowrank_linear: bias must be a CPU tensor");
  }
  TORCH_CHECK(activation >= 0 && activation <= 3, "lowrank_linear: unknown activation code ",
              activation);
}

std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}

// ---- epilogues ---------------------------------------------------------------------------------
// The activation is a template parameter so each row loop is a straight-line body the compiler
// vectorizes; the float entry points are compiled twice, for the baseline ISA and for AVX2+FMA
// (cpu_isa.h).

template <Activation A, typename T>
ROSITA_ALWAYS_INLINE void bias_act_rows(T* z, const T* bias, int64_t rows, int64_t cols,
                                        int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    T* zr = z + i * ld;
    if (bias != nullptr) {
      for (int64_t j = 0; j < cols; ++j) zr[j] = act_forward_t<A, T>(zr[j] + bias[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) zr[j] = act_forward_t<A, T>(zr[j]);
    }
  }
}

// z <- grad * act'(z + bias)
template <Activation A, typename T>
ROSITA_ALWAYS_INLINE void act_grad_rows(T* z, const T* grad, const T* bias, int64_t rows,
                                        int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* zr = z + i * cols;
    const T* gr = grad + i * cols;
    if (bias != nullptr) {
      for (int64_t j = 0; j < cols; ++j) zr[j] = gr[j] * act_grad_t<A, T>(zr[j] + bias[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) zr[j] = gr[j] * act_grad_t<A, T>(zr[j]);
    }
  }
}

template <typename T>
ROSITA_ALWAYS_INLINE void bias_act_dispatch(T* z, const T* bias, int64_t rows, int64_t cols,
                                            int64_t ld, Activation a) {
  switch (a) {
    case Activation::ReLU: return bias_act_rows<Activation::ReLU>(z, bias, rows, cols, ld);
    case Activation::Gelu: return bias_act_rows<Activation::Gelu>(z, bias, rows, cols, ld);
    case Activation::GeluTanh:
      return bias_act_rows<Activation::GeluTanh>(z, bias, rows, cols, ld);
    default: return bias_act_rows<Activation::None>(z, bias, rows, cols, ld);
  }
}

template <typename T>
ROSITA_ALWAYS_INLINE void act_grad_dispatch(T* z, const T* grad, const T* bias, int64_t rows,
                                            int64_t cols, Activation a) {
  switch (a) {
    case Activation::ReLU: return act_grad_rows<Activation::ReLU>(z, grad, bias, rows, cols);
    case Activation::Gelu: return act_grad_rows<Activation::Gelu>(z, grad, bias, rows, cols);
    case Activation::GeluTanh:
      return act_grad_rows<Activation::GeluTanh>(z, grad, bias, rows, cols);
    default: return act_grad_rows<Activation::None>(z, grad, bias, rows, cols);
  }
}

void bias_act_f32_base(float* z, const float* bias, int64_t rows, int64_t cols, int64_t ld,
                       Activation a) {
  bias_act_dispatch<float>(z, bias, rows, cols, ld, a);
}

void act_grad_f32_base(float* z, const float* grad, const float* bias, int64_t rows, int64_t cols,
                       Activation a) {
  act_grad_dispatch<float>(z, grad, bias, rows, cols, a);
}

#ifdef ROSITA_X86_DISPATCH
ROSITA_AVX2 void bias_act_f32_avx2(float* z, const float* bias, int64_t rows, int64_t cols,
                                   int64_t ld, Activation a) {
  bias_act_dispatch<float>(z, bias, rows, cols, ld, a);
}

ROSITA_AVX2 void act_grad_f32_avx2(float* z, const float* grad, const float* bias, int64_t rows,
                                   int64_t cols, Activation a) {
  act_grad_dispatch<float>(z, grad, bias, rows, cols, a);
}
#endif

// z[i * ld + j] <- act(z[i * ld + j] + bias[j]) for a rows x cols block.
void bias_act(float* z, const float* bias, int64_t rows, int64_t cols, int64_t ld, Activation a) {
#ifdef ROSITA_X86_DISPATCH
  if (cpu_isa() != Isa::Base) return bias_act_f32_avx2(z, bias, rows, cols, ld, a);
#endif
  bias_act_f32_base(z, bias, rows, cols, ld, a);
}
void act_grad(float* z, const float* grad, const float* bias, int64_t rows, int64_t cols,
              Activation a) {
#ifdef ROSITA_X86_DISPATCH
  if (cpu_isa() != Isa::Base) return act_grad_f32_avx2(z, grad, bias, rows, cols, a);
#endif
  act_grad_f32_base(z, grad, bias, rows, cols, a);
}
void bias_act(double* z, const double* bias, int64_t rows, int64_t cols, int64_t ld,
              Activation a) {
  bias_act_dispatch<double>(z, bias, rows, cols, ld, a);
}
void act_grad(double* z, const double* grad, const double* bias, int64_t rows, int64_t cols,
              Activation a) {
  act_grad_dispatch<double>(z, grad, bias, rows, cols, a);
}

// dtype the GEMMs run in for inputs of dtype t. bf16 stays bf16: oneDNN's bf16 GEMMs accumulate
// in fp32 and use the CPU's bf16 dot-product instructions where it has them (the eager path does
// the same). fp16 is converted to fp32: CPUs without AVX512-FP16 have no fast fp16 GEMM.
at::ScalarType gemm_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// Forward. Without an activation there is nothing to fuse: the two whole products with the bias
// folded into the second GEMM (addmm) are the calls eager F.linear(F.linear(x, v), u, bias) makes,
// so the result equals eager's. With an activation, work is tiled as (row block, column group)
// tasks over the threads. A task computes its rows' rank-r intermediate h = x v^T once (it stays
// in cache), then sweeps its columns in chunks small enough (kChunkBytes) that each chunk of
// h u^T is finished by the bias/activation epilogue while it is still in L1/L2. Column groups
// only exist when there are fewer row blocks than threads (few tokens); each group then
// recomputes its h block, which is cheap exactly then.
// With h_out, the forward also returns h = x v^T ([m, r], accumulation dtype) for the backward.
template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& x2d, const at::Tensor& u, const at::Tensor& v,
                        const std::optional<at::Tensor>& bias, Activation act,
                        at::Tensor* h_out = nullptr) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto in_dtype = x2d.scalar_type();
  const auto acc_dtype = acc_type(in_dtype);
  const auto gdt = gemm_type(in_dtype);
  const int64_t m = x2d.size(0), n = u.size(0), r = u.size(1);
  if (m == 0 || n == 0) {
    if (h_out != nullptr) *h_out = at::zeros({m, r}, x2d.options().dtype(acc_dtype));
    return empty_output({m, n}, x2d.options());
  }

  // Weights in the GEMM dtype (no copy unless fp16); transposes are BLAS flags, not copies.
  const auto u_g = u.to(gdt);  // [n, r]
  const auto v_g = v.to(gdt);  // [r, k]

  if (act == Activation::None) {
    const auto h = at::mm(x2d.to(gdt), v_g.t());
    auto z = bias.has_value() ? at::addmm(bias->to(gdt), h, u_g.t()) : at::mm(h, u_g.t());
    if (h_out != nullptr) *h_out = h.to(acc_dtype);
    return z.to(in_dtype);
  }

  const auto bias_acc = bias.has_value() ? bias->to(acc_dtype).contiguous() : at::Tensor();
  const acc_t* bias_ptr = bias.has_value() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const auto acc_opts = x2d.options().dtype(acc_dtype);
  // fp32/fp64: the product lands in the output and the epilogue finishes it there in place.
  // bf16: the product lands in the output, the epilogue runs on an fp32 copy of the chunk.
  // fp16: the product lands in an fp32 chunk buffer, finished there, then converted.
  const bool epilogue_in_place = gdt == acc_dtype && gdt == in_dtype;
  const bool gemm_into_output = gdt == in_dtype;

  auto out = empty_output({m, n}, x2d.options());
  // Every column group computes its rows' h; the first group's lands in h_full.
  auto h_full = h_out != nullptr ? empty_output({m, r}, x2d.options().dtype(gdt)) : at::Tensor();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bm = std::min<int64_t>(kMaxBlockRows, (m + threads - 1) / threads);
  const int64_t row_blocks = (m + bm - 1) / bm;
  const int64_t col_groups =
      std::max<int64_t>(1, std::min<int64_t>(threads / row_blocks, (n + kMinGroupCols - 1) / kMinGroupCols));
  const int64_t group_cols = (n + col_groups - 1) / col_groups;
  const int64_t chunk = std::clamp<int64_t>(
      (kChunkBytes / (bm * static_cast<int64_t>(sizeof(acc_t)))) / 16 * 16, 16, std::max<int64_t>(16, n));

  at::parallel_for(0, row_blocks * col_groups, 1, [&](int64_t t0, int64_t t1) {
    auto h = empty_output({bm, r}, x2d.options().dtype(gdt));
    auto o = epilogue_in_place ? at::Tensor() : empty_output({bm, chunk}, acc_opts);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row0 = (t / col_groups) * bm, rows = std::min(bm, m - row0);
      const int64_t col_begin = (t % col_groups) * group_cols;
      const int64_t col_end = std::min(n, col_begin + group_cols);
      auto hb = h_out != nullptr && t % col_groups == 0 ? h_full.narrow(0, row0, rows)
                                                         : h.narrow(0, 0, rows);
      at::mm_out(hb, x2d.narrow(0, row0, rows).to(gdt), v_g.t());
      for (int64_t c0 = col_begin; c0 < col_end; c0 += chunk) {
        const int64_t cols = std::min(chunk, col_end - c0);
        auto dst = out.narrow(0, row0, rows).narrow(1, c0, cols);
        const auto u_cols = u_g.narrow(0, c0, cols).t();
        const acc_t* b = bias_ptr ? bias_ptr + c0 : nullptr;
        if (epilogue_in_place) {
          at::mm_out(dst, hb, u_cols);
          bias_act(dst.mutable_data_ptr<acc_t>(), b, rows, cols, dst.stride(0), act);
          continue;
        }
        auto ob = o.narrow(0, 0, rows).narrow(1, 0, cols);
        if (gemm_into_output) {
          at::mm_out(dst, hb, u_cols);
          ob.copy_(dst);
        } else {
          at::mm_out(ob, hb, u_cols);
        }
        bias_act(ob.mutable_data_ptr<acc_t>(), b, rows, cols, ob.stride(0), act);
        dst.copy_(ob);
      }
    }
  });
  if (h_out != nullptr) *h_out = h_full.to(acc_dtype);
  return out;
}

// Backward. Row-local work (recompute h = x v^T and z, dz = grad * act'(z), g = dz u, dx = g v) is
// fused per row block in cache; the reductions over rows (du = dz^T h, dv = g^T x, dbias = sum dz)
// are single large BLAS products / reductions over the buffers the block loop filled. Products
// run in the GEMM dtype (bf16 natively, see gemm_type); act'(z) is evaluated in fp32.
// h_saved: the forward's h (lowrank_linear_train_cpp); without it h is recomputed.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, Activation act,
    const std::optional<at::Tensor>& h_saved) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto in_dtype = x2d.scalar_type();
  const auto acc_dtype = acc_type(in_dtype);
  // ReLU's derivative jumps at 0: pre-activations recomputed from an h rounded to bf16 land on the
  // wrong side of the kink often enough to move whole gradient entries, so its mask is computed
  // from fp32 products. Smooth activations take the bf16 GEMMs.
  const auto gdt = act == Activation::ReLU ? acc_dtype : gemm_type(in_dtype);
  const int64_t m = x2d.size(0), k = x2d.size(1), n = u.size(0), r = u.size(1);
  const auto g_opts = x2d.options().dtype(gdt);
  const bool gemm_native = gdt == in_dtype;

  auto dx = empty_output({m, k}, x2d.options());
  const auto u_g = u.to(gdt);  // [n, r]
  const auto v_g = v.to(gdt);  // [r, k]
  const auto bias_acc = bias.has_value() ? bias->to(acc_dtype).contiguous() : at::Tensor();
  const acc_t* bias_ptr = bias.has_value() ? bias_acc.const_data_ptr<acc_t>() : nullptr;

  // Without an activation dz is the incoming gradient itself and needs no buffer.
  const bool need_dz_buffer = act != Activation::None || !gemm_native;
  auto dz = need_dz_buffer ? empty_output({m, n}, g_opts) : grad2d;
  // A saved h is used unless the ReLU mask needs fp32 products the bf16 forward did not make.
  const bool use_saved = h_saved.has_value() && h_saved->defined() &&
                         !(act == Activation::ReLU && gdt != gemm_type(in_dtype));
  if (use_saved) {
    TORCH_CHECK(h_saved->dim() == 2 && h_saved->size(0) == m && h_saved->size(1) == r,
                "lowrank_linear backward: h must be [rows, rank]");
  }
  auto h = use_saved ? h_saved->detach().to(gdt).contiguous() : empty_output({m, r}, g_opts);
  auto g = empty_output({m, r}, g_opts);
  const int64_t bm = block_rows(m, n, sizeof(acc_t));
  const int64_t n_blocks = m == 0 ? 0 : (m + bm - 1) / bm;

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    auto dx_buf = gemm_native ? at::Tensor() : empty_output({bm, k}, g_opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * bm, rows = std::min(bm, m - row0);
      auto hb = h.narrow(0, row0, rows);
      if (!use_saved) at::mm_out(hb, x2d.narrow(0, row0, rows).to(gdt), v_g.t());
      auto dzb = dz.narrow(0, row0, rows);
      const auto grad_b = grad2d.narrow(0, row0, rows);
      if (act != Activation::None) {
        at::mm_out(dzb, hb, u_g.t());  // z without bias, overwritten in place by dz below
        if (gdt == acc_dtype) {
          const auto gb_in = grad_b.to(acc_dtype);
          act_grad(dzb.mutable_data_ptr<acc_t>(), gb_in.const_data_ptr<acc_t>(), bias_ptr, rows,
                   n, act);
        } else {  // bf16: act'(z) in fp32 on a copy of the block, rounded back once
          auto z32 = dzb.to(acc_dtype);
          const auto g32 = grad_b.to(acc_dtype);
          act_grad(z32.mutable_data_ptr<acc_t>(), g32.const_data_ptr<acc_t>(), bias_ptr, rows, n,
                   act);
          dzb.copy_(z32);
        }
      } else if (need_dz_buffer) {
        dzb.copy_(grad_b);
      }
      auto gb = g.narrow(0, row0, rows);
      at::mm_out(gb, dzb, u_g);
      if (gemm_native) {
        auto dxb = dx.narrow(0, row0, rows);
        at::mm_out(dxb, gb, v_g);
      } else {
        auto dxb = dx_buf.narrow(0, 0, rows);
        at::mm_out(dxb, gb, v_g);
        dx.narrow(0, row0, rows).copy_(dxb);
      }
    }
  });

  auto du = at::mm(dz.t(), h).to(u.scalar_type());
  auto dv = at::mm(g.t(), x2d.to(gdt)).to(v.scalar_type());
  auto dbias = bias.has_value()
                   ? at::sum(dz, {0}, false, acc_dtype).to(bias->scalar_type())
                   : at::Tensor();
  return {dx, du, dv, dbias};
}

// Shared by the inference and the training forward; h_out (training) also receives h = x v^T.
at::Tensor forward_entry(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                         const std::optional<at::Tensor>& bias, int64_t activation,
                         at::Tensor* h_out) {
  // Kernels compute; autograd is the op's business (rosita_fast/ops/lowrank_linear.py).
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_inputs(x, u, v, bias, activation);
  auto out_shape = x.sizes().vec();
  out_shape.back() = u.size(0);
  // Worker threads of at::parallel_for do not inherit the dispatch guard above, so the kernels
  // work on detached views (no autograd metadata) of the inputs.
  const auto x2d = x.detach().reshape({-1, x.size(-1)}).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear_fwd",
                                  [&] {
                                    out = forward_impl<scalar_t>(x2d, u.detach(), v.detach(), detached(bias),
                                                                 static_cast<Activation>(activation), h_out);
                                  });
  return out.view(out_shape);
}

at::Tensor lowrank_linear_fwd(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                              const std::optional<at::Tensor>& bias, int64_t activation) {
  return forward_entry(x, u, v, bias, activation, nullptr);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_train_fwd(
    const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t activation) {
  at::Tensor h;
  auto out = forward_entry(x, u, v, bias, activation, &h);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t activation,
    const std::optional<at::Tensor>& h) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_inputs(x, u, v, bias, activation);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "lowrank_linear backward: grad dtype must match x");
  const auto x2d = x.detach().reshape({-1, x.size(-1)}).contiguous();
  const auto g2d = grad.detach().reshape({-1, u.size(0)}).contiguous();
  TORCH_CHECK(g2d.size(0) == x2d.size(0), "lowrank_linear backward: grad has the wrong shape");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear_bwd",
                                  [&] {
                                    res = backward_impl<scalar_t>(g2d, x2d, u.detach(), v.detach(), detached(bias),
                                                                  static_cast<Activation>(activation), h);
                                  });
  std::get<0>(res) = std::get<0>(res).view(x.sizes());
  return res;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("lowrank_linear_cpp(Tensor x, Tensor u, Tensor v, Tensor? bias, int activation) -> Tensor");
  m.def(
      "lowrank_linear_train_cpp(Tensor x, Tensor u, Tensor v, Tensor? bias, int activation) -> "
      "(Tensor, Tensor)");
  m.def(
      "lowrank_linear_backward_cpp(Tensor grad, Tensor x, Tensor u, Tensor v, Tensor? bias, "
      "int activation, Tensor? h=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("lowrank_linear_cpp", &lowrank_linear_fwd);
  m.impl("lowrank_linear_train_cpp", &lowrank_linear_train_fwd);
  m.impl("lowrank_linear_backward_cpp", &lowrank_linear_bwd);
}

}  // namespace rosita_fast
