// CUDA kernels of kd_logits_loss (rosita_fast/ops/kd_logits_loss.py): one thread block per row of
// student logits s and teacher logits t ([rows, C]); a = s / T, b = t / T, p = softmax(b),
// q = softmax(a):
//   kl: l = sum p (log p - log q)    soft_ce: l = -sum p log q    d l / d s = (q - p) / T
//
// Each thread walks its strided share of the row once, keeping running maxima of a and b and,
// relative to them, Z_a = sum exp(a - m_a), Z_b = sum w (w = exp(b - m_b)) and the p-weighted term
// D (kl: sum w ((b - m_b) - (a - m_a)); soft_ce: sum w (a - m_a)), rescaled exactly when a maximum
// moves (as the C++ and Triton kernels do). The threads' states are merged with warp shuffles,
// then across the warps through shared memory, at the row's maxima. With a gradient, a second
// sweep over the row (from L2) writes (q - p) / T in the logits' dtype. Rules as the other
// backends: p = 0 classes add nothing, a dropped row (mask) or one with no teacher distribution
// gets 0 and a zero gradient without being read, a student row of all -inf gives +inf, NaN or
// +inf logits give NaN. fp16/bf16 are computed in fp32, fp64 in fp64.
//
// Compiled for sm_80 and sm_90 by the test suite (ptxas report checked for spills); the
// development machines have no GPU to run it, so its math mirrors the C++ kernel line by line.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "rosita_fast/epilogue.h"

namespace rosita_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename A> struct State {
  A ma, mb, za, zb, d;
  int bad;
};

template <typename A> __device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}
template <typename A> __device__ __forceinline__ A ref_of(A m) { return m == neg_inf<A>() ? A(0) : m; }
// NaN or +inf: the softmax of such a row is undefined (its loss and gradient are NaN).
template <typename A> __device__ __forceinline__ bool bad_logit(A x) {
  return !(x < -neg_inf<A>()) && x != neg_inf<A>();
}
__device__ __forceinline__ float exp_a(float x) { return __expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }

// st's sums at maxima ma2 >= st.ma, mb2 >= st.mb (exact for D: its terms' offsets shift with the
// reference points; sums that saw only -inf stay 0).
template <typename A> __device__ __forceinline__ void move_to(State<A>& st, A ma2, A mb2, bool kl) {
  const A ra = ref_of(st.ma), rb = ref_of(st.mb), ra2 = ref_of(ma2), rb2 = ref_of(mb2);
  const A fa = st.ma == neg_inf<A>() ? A(0) : exp_a(ra - ra2);
  const A fb = st.mb == neg_inf<A>() ? A(0) : exp_a(rb - rb2);
  const A shift = kl ? (rb - rb2) - (ra - ra2) : (ra - ra2);
  st.d = st.mb == neg_inf<A>() ? A(0) : fb * (st.d + st.zb * shift);
  st.za *= fa;
  st.zb *= fb;
  st.ma = ma2;
  st.mb = mb2;
}

template <typename A> __device__ __forceinline__ void merge(State<A>& x, State<A> y, bool kl) {
  const A ma = fmax(x.ma, y.ma), mb = fmax(x.mb, y.mb);
  move_to(x, ma, mb, kl);
  move_to(y, ma, mb, kl);
  x.za += y.za;
  x.zb += y.zb;
  x.d += y.d;
  x.bad |= y.bad;
}

template <typename A> __device__ __forceinline__ State<A> shfl_down(const State<A>& s, int o) {
  State<A> r;
  r.ma = __shfl_down_sync(0xffffffffu, s.ma, o);
  r.mb = __shfl_down_sync(0xffffffffu, s.mb, o);
  r.za = __shfl_down_sync(0xffffffffu, s.za, o);
  r.zb = __shfl_down_sync(0xffffffffu, s.zb, o);
  r.d = __shfl_down_sync(0xffffffffu, s.d, o);
  r.bad = __shfl_down_sync(0xffffffffu, s.bad, o);
  return r;
}

template <typename scalar_t, bool Grad>
__global__ void __launch_bounds__(kThreads) kd_logits_kernel(
    const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, const bool* __restrict__ mask,
    typename AccType<scalar_t>::type* __restrict__ loss, scalar_t* __restrict__ grad, int64_t C,
    int64_t ld_s, int64_t ld_t, typename AccType<scalar_t>::type inv_t, bool kl) {
  using A = typename AccType<scalar_t>::type;
  __shared__ State<A> warp_states[kWarps];
  __shared__ State<A> row_state;
  const int64_t row = blockIdx.x;
  const bool keep = mask == nullptr || mask[row];
  const scalar_t* sr = s + row * ld_s;
  const scalar_t* tr = t + row * ld_t;
  State<A> st{neg_inf<A>(), neg_inf<A>(), A(0), A(0), A(0), 0};
  if (keep) {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const A x = static_cast<A>(sr[c]) * inv_t, y = static_cast<A>(tr[c]) * inv_t;
      st.bad |= bad_logit(x) || bad_logit(y);
      const A ma2 = x > st.ma ? x : st.ma, mb2 = y > st.mb ? y : st.mb;
      if (ma2 != st.ma || mb2 != st.mb) move_to(st, ma2, mb2, kl);
      const A xa = x - ref_of(st.ma), yb = y - ref_of(st.mb);
      const A w = exp_a(yb);
      st.za += exp_a(xa);
      st.zb += w;
      st.d += w > A(0) ? w * (kl ? yb - xa : xa) : A(0);
    }
  }
  for (int o = 16; o > 0; o >>= 1) merge(st, shfl_down(st, o), kl);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    State<A> total = warp_states[0];
    for (int w = 1; w < kWarps; ++w) merge(total, warp_states[w], kl);
    row_state = total;
    A l;
    const A nan = std::numeric_limits<A>::quiet_NaN();
    if (total.bad) {
      l = nan;
    } else if (total.zb == A(0)) {
      l = A(0);  // no teacher distribution (or a dropped row)
    } else if (total.za == A(0)) {
      l = std::numeric_limits<A>::infinity();
    } else {
      const A log_za = log(total.za);
      l = kl ? total.d / total.zb - log(total.zb) + log_za : -total.d / total.zb + log_za;
    }
    loss[row] = l;
  }
  if (!Grad) return;
  __syncthreads();
  const State<A> fin = row_state;
  scalar_t* gr = grad + row * C;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const A cq = fin.bad ? nan : (fin.za > A(0) && fin.zb > A(0) ? inv_t / fin.za : A(0));
  const A cp = fin.bad ? nan : (fin.zb > A(0) ? inv_t / fin.zb : A(0));
  const A ra = ref_of(fin.ma), rb = ref_of(fin.mb);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    A g = A(0);
    if (keep) {
      const A x = static_cast<A>(sr[c]) * inv_t, y = static_cast<A>(tr[c]) * inv_t;
      g = exp_a(x - ra) * cq - exp_a(y - rb) * cp;
    }
    gr[c] = static_cast<scalar_t>(g);
  }
}

at::Tensor rows_2d(const at::Tensor& x, int64_t C) {
  auto x2 = x.detach().reshape({-1, C});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& student, const at::Tensor& teacher,
                                       double temperature, int64_t kind,
                                       const std::optional<at::Tensor>& mask, bool with_grad) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && student.device() == teacher.device(),
              "kd_logits_loss_cuda: student and teacher logits must be on one CUDA device");
  TORCH_CHECK(student.sizes() == teacher.sizes() && student.scalar_type() == teacher.scalar_type(),
              "kd_logits_loss_cuda: student and teacher logits must have one shape and dtype");
  TORCH_CHECK(kind == 0 || kind == 1, "kd_logits_loss_cuda: kind must be 0 (kl) or 1 (soft_ce)");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "kd_logits_loss_cuda: temperature must be positive and finite");
  const int64_t C = student.size(-1);
  TORCH_CHECK(C > 0, "kd_logits_loss_cuda: logits need at least one class");
  const c10::cuda::CUDAGuard guard(student.device());
  const auto s = rows_2d(student, C);
  const auto t = rows_2d(teacher, C);
  const int64_t rows = s.size(0);
  TORCH_CHECK(rows < (int64_t{1} << 31), "kd_logits_loss_cuda: at most 2^31 - 1 rows");
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == rows &&
                    mask->device() == student.device(),
                "kd_logits_loss_cuda: mask must be a bool tensor with one entry per row");
    m = mask->reshape({rows}).contiguous();
  }
  const auto dt = student.scalar_type();
  auto loss = at::empty({rows}, student.options().dtype(dt == at::kDouble ? at::kDouble
                                                                         : at::kFloat));
  at::Tensor g = with_grad ? at::empty({rows, C}, student.options()) : at::Tensor();
  if (rows == 0) return {loss, g};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "kd_logits_loss_cuda", [&] {
    using A = typename AccType<scalar_t>::type;
    const auto* sp = s.const_data_ptr<scalar_t>();
    const auto* tp = t.const_data_ptr<scalar_t>();
    const bool* mp = m.defined() ? m.const_data_ptr<bool>() : nullptr;
    auto* lp = loss.data_ptr<A>();
    const A inv_t = static_cast<A>(1.0 / temperature);
    if (with_grad) {
      kd_logits_kernel<scalar_t, true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          sp, tp, mp, lp, g.data_ptr<scalar_t>(), C, s.stride(0), t.stride(0), inv_t, kind == 0);
    } else {
      kd_logits_kernel<scalar_t, false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          sp, tp, mp, lp, nullptr, C, s.stride(0), t.stride(0), inv_t, kind == 0);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, g};
}

at::Tensor forward_cuda(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                        int64_t kind, const std::optional<at::Tensor>& mask) {
  return std::get<0>(run(student, teacher, temperature, kind, mask, false));
}

std::tuple<at::Tensor, at::Tensor> train_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                              double temperature, int64_t kind,
                                              const std::optional<at::Tensor>& mask) {
  return run(student, teacher, temperature, kind, mask, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def(
      "kd_logits_loss_cuda(Tensor student, Tensor teacher, float temperature, int kind, "
      "Tensor? mask=None) -> Tensor");
  m.def(
      "kd_logits_loss_train_cuda(Tensor student, Tensor teacher, float temperature, int kind, "
      "Tensor? mask=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CUDA, m) {
  m.impl("kd_logits_loss_cuda", &forward_cuda);
  m.impl("kd_logits_loss_train_cuda", &train_cuda);
}

}  // namespace rosita_fast
