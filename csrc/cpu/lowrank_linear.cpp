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

#include "rosita_fast/epilogue.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

constexpr int64_t kMaxBlockRows = 64;
// Budget for one output block (bytes): roughly half of a per-core L2.
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

template <typename scalar_t, typename acc_t>
void apply_epilogue(const acc_t* src, scalar_t* dst, const acc_t* bias, int64_t rows, int64_t cols,
                    Activation act) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* s = src + i * cols;
    scalar_t* d = dst + i * cols;
    if (bias != nullptr) {
      for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<scalar_t>(bias_act<acc_t>(s[j], bias[j], act));
    } else {
      for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<scalar_t>(act_forward<acc_t>(s[j], act));
    }
  }
}

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& x2d, const at::Tensor& u, const at::Tensor& v,
                        const std::optional<at::Tensor>& bias, Activation act) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto acc_dtype = acc_type(x2d.scalar_type());
  const int64_t m = x2d.size(0), k = x2d.size(1), n = u.size(0), r = u.size(1);
  auto out = empty_output({m, n}, x2d.options());
  if (m == 0 || n == 0) return out;

  // Weights are small next to activations; converting them once keeps the block loop simple.
  const auto ut = u.to(acc_dtype).t().contiguous();  // [r, n]
  const auto vt = v.to(acc_dtype).t().contiguous();  // [k, r]
  const auto bias_acc = bias.has_value() ? bias->to(acc_dtype).contiguous() : at::Tensor();
  const acc_t* bias_ptr = bias.has_value() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const bool same_dtype = x2d.scalar_type() == acc_dtype;
  const int64_t bm = block_rows(m, n, sizeof(acc_t));
  const int64_t n_blocks = (m + bm - 1) / bm;
  const auto acc_opts = x2d.options().dtype(acc_dtype);

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    auto h = empty_output({bm, r}, acc_opts);
    auto o = same_dtype ? at::Tensor() : empty_output({bm, n}, acc_opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * bm, rows = std::min(bm, m - row0);
      auto xb = x2d.narrow(0, row0, rows);
      if (!same_dtype) xb = xb.to(acc_dtype);
      auto hb = h.narrow(0, 0, rows);
      at::mm_out(hb, xb, vt);
      // fp32/fp64: the product is written straight into the output and finished in place.
      auto ob = same_dtype ? out.narrow(0, row0, rows) : o.narrow(0, 0, rows);
      at::mm_out(ob, hb, ut);
      apply_epilogue<scalar_t, acc_t>(ob.const_data_ptr<acc_t>(),
                                      out.mutable_data_ptr<scalar_t>() + row0 * n, bias_ptr, rows, n,
                                      act);
    }
  });
  return out;
}

// Backward. Row-local work (recompute h = x v^T and z, dz = grad * act'(z), g = dz u, dx = g v) is
// fused per row block in cache; the reductions over rows (du = dz^T h, dv = g^T x, dbias = sum dz)
// are single large BLAS products / reductions over the buffers the block loop filled.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, Activation act) {
  using acc_t = typename AccType<scalar_t>::type;
  const auto acc_dtype = acc_type(x2d.scalar_type());
  const int64_t m = x2d.size(0), k = x2d.size(1), n = u.size(0), r = u.size(1);
  const auto acc_opts = x2d.options().dtype(acc_dtype);
  const bool same_dtype = x2d.scalar_type() == acc_dtype;

  auto dx = empty_output({m, k}, x2d.options());
  const auto u_acc = u.to(acc_dtype).contiguous();   // [n, r]
  const auto ut = u_acc.t().contiguous();             // [r, n]
  const auto v_acc = v.to(acc_dtype).contiguous();   // [r, k]
  const auto vt = v_acc.t().contiguous();             // [k, r]
  const auto bias_acc = bias.has_value() ? bias->to(acc_dtype).contiguous() : at::Tensor();
  const acc_t* bias_ptr = bias.has_value() ? bias_acc.const_data_ptr<acc_t>() : nullptr;

  // Without an activation dz is the incoming gradient itself and needs no buffer.
  const bool need_dz_buffer = act != Activation::None || !same_dtype;
  auto dz = need_dz_buffer ? empty_output({m, n}, acc_opts) : grad2d;
  auto h = empty_output({m, r}, acc_opts);
  auto g = empty_output({m, r}, acc_opts);
  const int64_t bm = block_rows(m, n, sizeof(acc_t));
  const int64_t n_blocks = m == 0 ? 0 : (m + bm - 1) / bm;

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    auto dx_buf = same_dtype ? at::Tensor() : empty_output({bm, k}, acc_opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * bm, rows = std::min(bm, m - row0);
      auto xb = x2d.narrow(0, row0, rows);
      if (!same_dtype) xb = xb.to(acc_dtype);
      auto hb = h.narrow(0, row0, rows);
      at::mm_out(hb, xb, vt);
      auto dzb = dz.narrow(0, row0, rows);
      if (act != Activation::None) {
        at::mm_out(dzb, hb, ut);  // z without bias, overwritten in place by dz below
        const scalar_t* gp = grad2d.const_data_ptr<scalar_t>() + row0 * n;
        acc_t* zp = dzb.mutable_data_ptr<acc_t>();
        for (int64_t i = 0; i < rows * n; ++i) {
          const acc_t z = zp[i] + (bias_ptr ? bias_ptr[i % n] : acc_t(0));
          zp[i] = static_cast<acc_t>(gp[i]) * act_grad<acc_t>(z, act);
        }
      } else if (need_dz_buffer) {
        dzb.copy_(grad2d.narrow(0, row0, rows));
      }
      auto gb = g.narrow(0, row0, rows);
      at::mm_out(gb, dzb, u_acc);
      if (same_dtype) {
        auto dxb = dx.narrow(0, row0, rows);
        at::mm_out(dxb, gb, v_acc);
      } else {
        auto dxb = dx_buf.narrow(0, 0, rows);
        at::mm_out(dxb, gb, v_acc);
        dx.narrow(0, row0, rows).copy_(dxb);
      }
    }
  });

  const auto x_acc = same_dtype ? x2d : x2d.to(acc_dtype);
  auto du = at::mm(dz.t(), h).to(u.scalar_type());
  auto dv = at::mm(g.t(), x_acc).to(v.scalar_type());
  auto dbias = bias.has_value() ? dz.sum(0).to(bias->scalar_type()) : at::Tensor();
  return {dx, du, dv, dbias};
}

at::Tensor lowrank_linear_fwd(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                              const std::optional<at::Tensor>& bias, int64_t activation) {
  // Kernels compute; autograd is the op's business (registered in rosita_fast/ops.py).
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
                                                                 static_cast<Activation>(activation));
                                  });
  return out.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t activation) {
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
                                                                  static_cast<Activation>(activation));
                                  });
  std::get<0>(res) = std::get<0>(res).view(x.sizes());
  return res;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("lowrank_linear_cpp(Tensor x, Tensor u, Tensor v, Tensor? bias, int activation) -> Tensor");
  m.def(
      "lowrank_linear_backward_cpp(Tensor grad, Tensor x, Tensor u, Tensor v, Tensor? bias, "
      "int activation) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("lowrank_linear_cpp", &lowrank_linear_fwd);
  m.impl("lowrank_linear_backward_cpp", &lowrank_linear_bwd);
}

}  // namespace rosita_fast
