// C++ CPU kernels of kd_logits_loss (rosita_fast/ops/kd_logits_loss.py): per row i of student
// logits s and teacher logits t ([rows, C]), with a = s / T, b = t / T, p = softmax(b),
// q = softmax(a):
//   kl:      l_i = sum_c p (log p - log q)     soft_ce: l_i = -sum_c p log q
//   gradient (train): d l_i / d s = (q - p) / T  (both kinds)
//
// One pass over each row, blocks of kBlock classes at a time (converted to the accumulation type
// in an L1-resident buffer): the block's maxima update the running maxima of a and b, the running
// sums are rescaled once per block, and the block adds exp(a - m_a), exp(b - m_b) and the p-weighted
// term to per-lane accumulators (vectorized, polynomial exp of epilogue.h for fp32, libm for fp64).
// The terms are kept relative to the maxima, so logits of +-1e4 lose nothing to cancellation:
//   kl:      D = sum_c w_c ((b_c - m_b) - (a_c - m_a)),  l = D / Z_b - log Z_b + log Z_a
//   soft_ce: E = sum_c w_c (a_c - m_a),                  l = -E / Z_b + log Z_a
// with w_c = exp(b_c - m_b), Z_b = sum w, Z_a = sum exp(a - m_a); a change of maxima shifts D and E
// exactly (see rescale()). For the gradient the exponentials of the pass stay in a per-thread row
// buffer with each block's maxima, and a second sweep over that buffer (cache-resident: 8 bytes a
// class) writes (q - p) / T without another exp per class. Nothing of size rows x C is allocated
// but the gradient itself.
//
// Classes with p = 0 (teacher logit -inf) add nothing whatever the student's logit; a row whose
// teacher logits are all -inf, or that the mask drops, gets loss 0 and a zero gradient row and
// its logits are not read. A student row of all -inf under a teacher with mass has loss +inf. NaN
// or +inf in a row's logits makes its loss (and gradient) NaN. Rows are split over the threads with
// at::parallel_for; each row's result is independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/epilogue.h"
#include "rosita_fast/onednn_linear.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

constexpr int64_t kBlock = 512;  // classes per online step
constexpr int kLanes = 16;       // independent accumulators: the lanes of the vector registers
// About this many classes per task of at::parallel_for (less work runs on the calling thread).
constexpr int64_t kGrainElems = 32768;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// exp(x), exactly 0 for x <= -87 (where fp32's exp is below the smallest normal; -inf included):
// p = 0 must be an exact zero for the "0 log 0 = 0" rule.
ROSITA_ALWAYS_INLINE float exp0(float x) { return x > -87.0f ? fast_expf(x) : 0.0f; }
ROSITA_ALWAYS_INLINE double exp0(double x) { return std::exp(x); }

template <typename A> constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// NaN or +inf: the softmax of such a row is undefined (the reference gives NaN, so does this).
template <typename A> ROSITA_ALWAYS_INLINE int bad_logit(A x) {
  return !(x < std::numeric_limits<A>::infinity());
}

// A running maximum as the reference point of the exponentials: 0 while it is -inf (nothing seen,
// or only -inf), so exp(x - ref) never computes -inf - -inf.
template <typename A> ROSITA_ALWAYS_INLINE A ref_of(A m) { return m == kNegInf<A> ? A(0) : m; }

template <typename A> struct RowState {
  A ma = kNegInf<A>, mb = kNegInf<A>;  // running maxima of a and b
  A za = 0, zb = 0, d = 0;             // sum exp(a - ref a), sum w, the p-weighted term sum
  bool nan = false;
};

// New maxima ma2, mb2: rescale the sums to the new reference points (exact for D and E: each
// term's (b - ref_b) and (a - ref_a) shift by the change of reference).
template <typename A> ROSITA_ALWAYS_INLINE void rescale(RowState<A>& st, A ma2, A mb2, bool kl) {
  const A ra = ref_of(st.ma), rb = ref_of(st.mb), ra2 = ref_of(ma2), rb2 = ref_of(mb2);
  // Sums that have seen only -inf are zero and stay zero (no exp(+large) * 0).
  const A fa = st.ma == kNegInf<A> ? A(0) : std::exp(ra - ra2);
  const A fb = st.mb == kNegInf<A> ? A(0) : std::exp(rb - rb2);
  const A shift = kl ? (rb - rb2) - (ra - ra2) : (ra - ra2);
  st.d = st.mb == kNegInf<A> ? A(0) : fb * (st.d + st.zb * shift);
  st.za *= fa;
  st.zb *= fb;
  st.ma = ma2;
  st.mb = mb2;
}

// One row (Grad: also keep the exponentials in ea / wb and each block's reference points in
// refs, for grad_row). Returns the row's state; the caller turns it into the loss.
template <typename T, typename A, bool Grad>
ROSITA_ALWAYS_INLINE RowState<A> row_pass(const T* s, const T* t, int64_t C, A inv_t, bool kl,
                                          A* ea, A* wb, A* refs, A* abuf, A* bbuf) {
  RowState<A> st;
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, C - c0);
    A* a = Grad ? ea + c0 : abuf;
    A* b = Grad ? wb + c0 : bbuf;
    A mxa[kLanes], mxb[kLanes];
    int bad[kLanes];
    for (int l = 0; l < kLanes; ++l) mxa[l] = mxb[l] = kNegInf<A>, bad[l] = 0;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const A x = load_acc<A>(s[c0 + j + l]) * inv_t, y = load_acc<A>(t[c0 + j + l]) * inv_t;
        a[j + l] = x;
        b[j + l] = y;
        mxa[l] = x > mxa[l] ? x : mxa[l];
        mxb[l] = y > mxb[l] ? y : mxb[l];
        bad[l] |= bad_logit(x) | bad_logit(y);
      }
    }
    for (; j < n; ++j) {
      const A x = load_acc<A>(s[c0 + j]) * inv_t, y = load_acc<A>(t[c0 + j]) * inv_t;
      a[j] = x;
      b[j] = y;
      mxa[0] = x > mxa[0] ? x : mxa[0];
      mxb[0] = y > mxb[0] ? y : mxb[0];
      bad[0] |= bad_logit(x) | bad_logit(y);
    }
    A bma = st.ma, bmb = st.mb;
    for (int l = 0; l < kLanes; ++l) {
      bma = mxa[l] > bma ? mxa[l] : bma;
      bmb = mxb[l] > bmb ? mxb[l] : bmb;
      st.nan |= bad[l] != 0;
    }
    if (bma != st.ma || bmb != st.mb) rescale(st, bma, bmb, kl);
    const A ra = ref_of(st.ma), rb = ref_of(st.mb);
    if (Grad) {  // the maxima this block's exponentials are relative to
      refs[2 * blk] = st.ma;
      refs[2 * blk + 1] = st.mb;
    }
    A sa[kLanes], sb[kLanes], sd[kLanes];
    for (int l = 0; l < kLanes; ++l) sa[l] = sb[l] = sd[l] = 0;
    j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const A x = a[j + l] - ra, y = b[j + l] - rb;
        const A e = exp0(x), w = exp0(y);
        const A term = kl ? y - x : x;
        sa[l] += e;
        sb[l] += w;
        sd[l] += w > A(0) ? w * term : A(0);
        if (Grad) {
          a[j + l] = e;
          b[j + l] = w;
        }
      }
    }
    for (; j < n; ++j) {
      const A x = a[j] - ra, y = b[j] - rb;
      const A e = exp0(x), w = exp0(y);
      const A term = kl ? y - x : x;
      sa[0] += e;
      sb[0] += w;
      sd[0] += w > A(0) ? w * term : A(0);
      if (Grad) {
        a[j] = e;
        b[j] = w;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      st.za += sa[l];
      st.zb += sb[l];
      st.d += sd[l];
    }
  }
  return st;
}

template <typename A> ROSITA_ALWAYS_INLINE A row_loss(const RowState<A>& st, bool kl) {
  if (st.nan) return std::numeric_limits<A>::quiet_NaN();
  if (st.za == A(0)) return std::numeric_limits<A>::infinity();  // q = 0 where p > 0
  const A log_za = std::log(st.za);
  return kl ? st.d / st.zb - std::log(st.zb) + log_za : -st.d / st.zb + log_za;
}

// (q - p) / T from the exponentials row_pass kept.
template <typename T, typename A>
ROSITA_ALWAYS_INLINE void grad_row(const RowState<A>& st, const A* ea, const A* wb, const A* refs,
                                   int64_t C, A inv_t, T* g) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const A ra = ref_of(st.ma), rb = ref_of(st.mb);
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, C - c0);
    // (a block seen while a maximum was still -inf holds only zeros for it)
    const A ma = refs[2 * blk], mb = refs[2 * blk + 1];
    A cq = st.za > A(0) && ma != kNegInf<A> ? std::exp(ma - ra) / st.za * inv_t : A(0);
    A cp = mb != kNegInf<A> ? std::exp(mb - rb) / st.zb * inv_t : A(0);
    if (st.nan) cq = cp = nan;
    const A* e = ea + c0;
    const A* w = wb + c0;
    T* out = g + c0;
    for (int64_t j = 0; j < n; ++j) out[j] = store_as<T>(e[j] * cq - w[j] * cp);
  }
}

struct Args {
  const void* s;
  const void* t;
  int64_t ld_s, ld_t, rows, C;
  double inv_t;
  bool kl;
  const bool* mask;
  void* loss;
  void* grad;  // null: no gradient
};

// Rows [begin, end).
template <typename T, bool Grad>
ROSITA_ALWAYS_INLINE void rows_impl(const Args& p, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t C = p.C;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  std::vector<A> buf(Grad ? 2 * C + 2 * blocks : 2 * kBlock);
  A* ea = buf.data();
  A* wb = Grad ? ea + C : ea + kBlock;
  A* refs = Grad ? wb + C : nullptr;
  const A inv_t = static_cast<A>(p.inv_t);
  A* loss = static_cast<A*>(p.loss);
  for (int64_t i = begin; i < end; ++i) {
    T* g = Grad ? static_cast<T*>(p.grad) + i * C : nullptr;
    const T* s = static_cast<const T*>(p.s) + i * p.ld_s;
    const T* t = static_cast<const T*>(p.t) + i * p.ld_t;
    if (p.mask != nullptr && !p.mask[i]) {
      loss[i] = 0;
      if (Grad) std::fill(g, g + C, store_as<T>(A(0)));
      continue;
    }
    const RowState<A> st = row_pass<T, A, Grad>(s, t, C, inv_t, p.kl, ea, wb, refs, ea, wb);
    if (st.zb == A(0) && !st.nan) {  // the teacher rules out every class: no distribution
      loss[i] = 0;
      if (Grad) std::fill(g, g + C, store_as<T>(A(0)));
      continue;
    }
    loss[i] = row_loss(st, p.kl);
    if (Grad) grad_row<T, A>(st, ea, wb, refs, C, inv_t, g);
  }
}

template <typename T, bool Grad> void rows_base(const Args& p, int64_t b, int64_t e) {
  rows_impl<T, Grad>(p, b, e);
}
#ifdef ROSITA_X86_DISPATCH
template <typename T, bool Grad> ROSITA_AVX2 void rows_avx2(const Args& p, int64_t b, int64_t e) {
  rows_impl<T, Grad>(p, b, e);
}
template <typename T, bool Grad>
ROSITA_AVX512 void rows_avx512(const Args& p, int64_t b, int64_t e) {
  rows_impl<T, Grad>(p, b, e);
}
#endif

template <typename T, bool Grad> void rows(const Args& p, int64_t b, int64_t e) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512: return rows_avx512<T, Grad>(p, b, e);
    case Isa::Avx2: return rows_avx2<T, Grad>(p, b, e);
    default: break;
  }
#endif
  rows_base<T, Grad>(p, b, e);
}

// ---- entry points ------------------------------------------------------------------------------

at::Tensor rows_2d(const at::Tensor& x, int64_t C) {
  auto x2 = x.reshape({-1, C});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& student, const at::Tensor& teacher,
                                       double temperature, int64_t kind,
                                       const std::optional<at::Tensor>& mask, bool grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(),
              "kd_logits_loss_cpp: CPU tensors only");
  TORCH_CHECK(student.dim() >= 1 && student.sizes() == teacher.sizes(),
              "kd_logits_loss_cpp: student and teacher logits must have one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "kd_logits_loss_cpp: student and teacher logits must have one dtype");
  TORCH_CHECK(kind == 0 || kind == 1, "kd_logits_loss_cpp: kind must be 0 (kl) or 1 (soft_ce)");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "kd_logits_loss_cpp: temperature must be positive and finite");
  const int64_t C = student.size(-1);
  TORCH_CHECK(C > 0, "kd_logits_loss_cpp: logits need at least one class");
  const auto s = rows_2d(student.detach(), C);
  const auto t = rows_2d(teacher.detach(), C);
  const int64_t rows_n = s.size(0);
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == rows_n,
                "kd_logits_loss_cpp: mask must be a bool tensor with one entry per row");
    m = mask->reshape({rows_n}).contiguous();
  }
  const auto dt = student.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = empty_output({rows_n}, student.options().dtype(acc));
  at::Tensor g;
  if (grad) g = empty_output({rows_n, C}, student.options());
  Args p{s.const_data_ptr(), t.const_data_ptr(), s.stride(0), t.stride(0), rows_n, C,
         1.0 / temperature, kind == 0, m.defined() ? m.const_data_ptr<bool>() : nullptr,
         loss.data_ptr(), grad ? g.data_ptr() : nullptr};
  if (rows_n == 0) return {loss, grad ? g : at::Tensor()};
  const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "kd_logits_loss_cpp", [&] {
    at::parallel_for(0, rows_n, grain, [&](int64_t b, int64_t e) {
      if (grad) {
        rows<scalar_t, true>(p, b, e);
      } else {
        rows<scalar_t, false>(p, b, e);
      }
    });
  });
  return {loss, g};
}

at::Tensor forward(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                   int64_t kind, const std::optional<at::Tensor>& mask) {
  return std::get<0>(run(student, teacher, temperature, kind, mask, false));
}

std::tuple<at::Tensor, at::Tensor> train_forward(const at::Tensor& student,
                                                 const at::Tensor& teacher, double temperature,
                                                 int64_t kind,
                                                 const std::optional<at::Tensor>& mask) {
  return run(student, teacher, temperature, kind, mask, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def(
      "kd_logits_loss_cpp(Tensor student, Tensor teacher, float temperature, int kind, "
      "Tensor? mask=None) -> Tensor");
  m.def(
      "kd_logits_loss_train_cpp(Tensor student, Tensor teacher, float temperature, int kind, "
      "Tensor? mask=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("kd_logits_loss_cpp", &forward);
  m.impl("kd_logits_loss_train_cpp", &train_forward);
}

}  // namespace rosita_fast
