// C++ CPU kernels for the fused BERT embedding layer:
//   out = LayerNorm((word + token_type) + position) * ln_weight + ln_bias,
// word = word_weight[input_ids] (dense table) or word_weight[input_ids] @ word_proj^T (factorized).
//
// Forward: one pass over each token's row (gather, the two adds, mean, variance and the affine
// LayerNorm, fp32 accumulation for fp16/bf16) with the row in an L1-resident buffer; tokens are
// split over the threads with at::parallel_for. A factorized table first projects all gathered
// [N, E] rows with one GEMM (the path rosita_fast/onednn_linear.h picks per dtype and size; fp16
// is projected in fp32).
// Backward: the LayerNorm backward per row into dx ([N, hidden], fp32), with the ln_weight /
// ln_bias gradients summed per fixed block of rows and the block sums added in block order; then
// the rows of dx are summed into the tables without atomics: the tokens are sorted by (id, token)
// and each (table row, column block) is written by one task that adds its tokens in token order.
// Every result is therefore independent of the thread count (deterministic). The factorized word
// table gets dx @ word_proj summed the same way, and word_proj the GEMM dx^T @ word_weight[ids].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/onednn_linear.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

// The row loops are compiled twice, for the baseline ISA and for AVX2+FMA+F16C (cpu_isa.h).

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per block of the backward's ln_weight/ln_bias partial sums: fixed, so that the order of the
// additions (and the result) does not depend on the thread count.
constexpr int64_t kBlockRows = 32;
// About this many elements per task of at::parallel_for (ATen's own grain: less work than that
// runs on the calling thread).
constexpr int64_t kGrainElems = 32768;
// At most this many token types have their gradient summed in the backward's row pass.
constexpr int64_t kMaxFusedTokenTypes = 8;
// Independent accumulators of the row reductions: the lanes of the vector registers.
constexpr int kLanes = 16;

// ---- element conversions: branch-free, so the loops over a row vectorize -----------------------
ROSITA_ALWAYS_INLINE float load(const float* p, int64_t j) { return p[j]; }
ROSITA_ALWAYS_INLINE double load(const double* p, int64_t j) { return p[j]; }
ROSITA_ALWAYS_INLINE float load(const c10::BFloat16* p, int64_t j) {
  const uint32_t bits = reinterpret_cast<const uint16_t*>(p)[j];
  return __builtin_bit_cast(float, bits << 16);
}
ROSITA_ALWAYS_INLINE float load(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }

ROSITA_ALWAYS_INLINE void store(float* p, int64_t j, float v) { p[j] = v; }
ROSITA_ALWAYS_INLINE void store(double* p, int64_t j, double v) { p[j] = v; }
// Round to nearest even; NaN stays a (quiet) NaN. The same rounding as c10::BFloat16(float).
ROSITA_ALWAYS_INLINE void store(c10::BFloat16* p, int64_t j, float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(p)[j] = v != v ? static_cast<uint16_t>(0x7FC0) : r;
}
ROSITA_ALWAYS_INLINE void store(c10::Half* p, int64_t j, float v) { p[j] = c10::Half(v); }

// ---- row reductions ----------------------------------------------------------------------------
template <typename A> ROSITA_ALWAYS_INLINE A fold(A* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// sum_j x[j]
template <typename A> ROSITA_ALWAYS_INLINE A row_sum(const A* x, int64_t n) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += x[j];
  return fold(acc);
}

// sum_j (x[j] - c)^2
template <typename A> ROSITA_ALWAYS_INLINE A row_sq_dev(const A* x, A c, int64_t n) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A d = x[j + l] - c;
      acc[l] += d * d;
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const A d = x[j] - c;
    acc[l] += d * d;
  }
  return fold(acc);
}

// (sum_j a[j], sum_j a[j] * b[j])
template <typename A> ROSITA_ALWAYS_INLINE std::pair<A, A> row_sum2(const A* a, const A* b, int64_t n) {
  A s[kLanes] = {}, p[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      s[l] += a[j + l];
      p[l] += a[j + l] * b[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    s[l] += a[j];
    p[l] += a[j] * b[j];
  }
  return {fold(s), fold(p)};
}

// ---- where a token's three summands live -------------------------------------------------------
// T: the tables' dtype; W: the word rows' (T for a dense table, the GEMM's output dtype for a
// factorized one); A: the accumulation dtype.
template <typename T, typename W, typename A> struct Rows {
  const int64_t* ids;      // [N] word ids (used when word_by_id)
  const int64_t* pos_ids;  // [N]
  const int64_t* tt_ids;   // [N], or nullptr without token types
  const W* word;           // the word table (word_by_id) or the projected rows [N, hidden]
  int64_t word_ld;
  bool word_by_id;
  const T* pos;
  int64_t pos_ld;
  const T* tt;
  int64_t tt_ld;
  int64_t hidden;

  // buf <- (word + token_type) + position of token i, in A (HF's order of the additions).
  ROSITA_ALWAYS_INLINE void sum(int64_t i, A* buf) const {
    const W* w = word + (word_by_id ? ids[i] : i) * word_ld;
    const T* p = pos + pos_ids[i] * pos_ld;
    const int64_t n = hidden;
    if (tt != nullptr) {
      const T* t = tt + tt_ids[i] * tt_ld;
      for (int64_t j = 0; j < n; ++j) buf[j] = (A(load(w, j)) + A(load(t, j))) + A(load(p, j));
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = A(load(w, j)) + A(load(p, j));
    }
  }
};

template <typename A> ROSITA_ALWAYS_INLINE A rstd_of(A sq_dev_sum, A inv_h, A eps) {
  return A(1) / std::sqrt(sq_dev_sum * inv_h + eps);
}

// Forward of tokens [begin, end): out rows (and, if mean != nullptr, the statistics).
template <typename T, typename W, typename A>
ROSITA_ALWAYS_INLINE void forward_rows_impl(const Rows<T, W, A>& r, const A* gamma, const A* beta, A eps,
                                  T* out, A* mean, A* rstd, int64_t begin, int64_t end, A* buf) {
  const int64_t n = r.hidden;
  const A inv_h = A(1) / A(n);
  for (int64_t i = begin; i < end; ++i) {
    r.sum(i, buf);
    const A mu = row_sum(buf, n) * inv_h;
    const A rs = rstd_of(row_sq_dev(buf, mu, n), inv_h, eps);
    T* o = out + i * n;
    for (int64_t j = 0; j < n; ++j) store(o, j, (buf[j] - mu) * rs * gamma[j] + beta[j]);
    if (mean != nullptr) {
      mean[i] = mu;
      rstd[i] = rs;
    }
  }
}

// LayerNorm backward of tokens [begin, end) (one block): dx rows (and, with dx_low, a copy in T
// for the bf16 GEMMs), and the block's partial sums of the ln_weight (pg) and ln_bias (pb)
// gradients and, with ptt ([token types, hidden]), of the token-type table's gradient. With
// gathered, the factorized word table's rows of the tokens are copied there ([N, rank]). Without
// saved statistics they are recomputed.
template <typename T, typename W, typename A>
ROSITA_ALWAYS_INLINE void backward_rows_impl(const Rows<T, W, A>& r, const T* grad, const A* gamma, A eps,
                                   const A* mean, const A* rstd, A* dx, T* dx_low, A* pg, A* pb,
                                   A* ptt, int64_t tt_rows, const T* table, int64_t table_ld,
                                   int64_t rank, T* gathered, int64_t begin, int64_t end, A* buf,
                                   A* g) {
  const int64_t n = r.hidden;
  const A inv_h = A(1) / A(n);
  for (int64_t j = 0; j < n; ++j) {
    pg[j] = A(0);
    pb[j] = A(0);
  }
  if (ptt != nullptr) {
    for (int64_t j = 0; j < tt_rows * n; ++j) ptt[j] = A(0);
  }
  for (int64_t i = begin; i < end; ++i) {
    r.sum(i, buf);
    A mu, rs;
    if (mean != nullptr) {
      mu = mean[i];
      rs = rstd[i];
    } else {
      mu = row_sum(buf, n) * inv_h;
      rs = rstd_of(row_sq_dev(buf, mu, n), inv_h, eps);
    }
    const T* dy = grad + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const A xh = (buf[j] - mu) * rs;
      const A d = A(load(dy, j));
      buf[j] = xh;
      g[j] = d * gamma[j];
      pg[j] += d * xh;
      pb[j] += d;
    }
    const auto [s1, s2] = row_sum2(g, buf, n);
    const A c1 = s1 * inv_h, c2 = s2 * inv_h;
    A* d = dx + i * n;
    for (int64_t j = 0; j < n; ++j) d[j] = rs * (g[j] - c1 - buf[j] * c2);
    if (ptt != nullptr) {
      A* t = ptt + r.tt_ids[i] * n;
      for (int64_t j = 0; j < n; ++j) t[j] += d[j];
    }
    if (dx_low != nullptr) {
      T* o = dx_low + i * n;
      for (int64_t j = 0; j < n; ++j) store(o, j, d[j]);
    }
    if (gathered != nullptr) {  // the factorized table's rows word_weight[ids] for d_proj
      std::memcpy(static_cast<void*>(gathered + i * rank),
                  static_cast<const void*>(table + r.ids[i] * table_ld), rank * sizeof(T));
    }
  }
}

// One task of the table gradients: dst[0:w] = sum over the listed tokens of their src rows (the
// caller offsets src to the task's first column), added in token order.
template <typename T, typename S, typename A>
ROSITA_ALWAYS_INLINE void gather_sum_impl(const S* src, int64_t ld, const std::pair<int64_t, int64_t>* toks,
                                int64_t count, int64_t w, T* dst, A* acc) {
  const S* s = src + toks[0].second * ld;
  for (int64_t j = 0; j < w; ++j) acc[j] = A(load(s, j));
  for (int64_t k = 1; k < count; ++k) {
    s = src + toks[k].second * ld;
    for (int64_t j = 0; j < w; ++j) acc[j] += A(load(s, j));
  }
  for (int64_t j = 0; j < w; ++j) store(dst, j, acc[j]);
}

// The ISA variants of the three row loops and their dispatchers.
#define ELN_VARIANTS(NAME, PARAMS, ARGS, ...)                            \
  template <__VA_ARGS__> void NAME##_base PARAMS { NAME##_impl ARGS; }  \
  ELN_AVX2_VARIANT(NAME, PARAMS, ARGS, __VA_ARGS__)                      \
  template <__VA_ARGS__> void NAME PARAMS {                              \
    ELN_AVX2_CALL(NAME, ARGS)                                            \
    NAME##_base ARGS;                                                    \
  }
#ifdef ROSITA_X86_DISPATCH
#define ELN_AVX2_VARIANT(NAME, PARAMS, ARGS, ...) \
  template <__VA_ARGS__> ROSITA_AVX2 void NAME##_avx2 PARAMS { NAME##_impl ARGS; }
#define ELN_AVX2_CALL(NAME, ARGS) \
  if (cpu_isa() != Isa::Base) return NAME##_avx2 ARGS;
#else
#define ELN_AVX2_VARIANT(NAME, PARAMS, ARGS, ...)
#define ELN_AVX2_CALL(NAME, ARGS)
#endif

ELN_VARIANTS(forward_rows,
             (const Rows<T, W, A>& r, const A* gamma, const A* beta, A eps, T* out, A* mean,
              A* rstd, int64_t begin, int64_t end, A* buf),
             (r, gamma, beta, eps, out, mean, rstd, begin, end, buf), typename T, typename W,
             typename A)
ELN_VARIANTS(backward_rows,
             (const Rows<T, W, A>& r, const T* grad, const A* gamma, A eps, const A* mean,
              const A* rstd, A* dx, T* dx_low, A* pg, A* pb, A* ptt, int64_t tt_rows,
              const T* table, int64_t table_ld, int64_t rank, T* gathered, int64_t begin,
              int64_t end, A* buf, A* g),
             (r, grad, gamma, eps, mean, rstd, dx, dx_low, pg, pb, ptt, tt_rows, table, table_ld,
              rank, gathered, begin, end, buf, g),
             typename T, typename W, typename A)
ELN_VARIANTS(gather_sum,
             (const S* src, int64_t ld, const std::pair<int64_t, int64_t>* toks, int64_t count,
              int64_t w, T* dst, A* acc),
             (src, ld, toks, count, w, dst, acc), typename T, typename S, typename A)

// ---- GEMMs (paths and their measurements: rosita_fast/onednn_linear.h) ---------------------------
// x [m, k] @ w [n, k]^T -> [m, n] in x's dtype (fp32, bf16 or fp64; bf16 accumulates in fp32):
// oneDNN's linear where the header prefers it (it takes strided operands), else at::mm.
at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w) {
  if (onednn::prefer(x.scalar_type(), x.size(0), w.size(0), x.size(1), false)) {
    return onednn::linear_pointwise(x, w, std::nullopt);
  }
  return at::mm(x, w.t());
}

// ---- argument handling -------------------------------------------------------------------------
struct Ids {
  at::Tensor ids, pos, tt;  // [N] int64, contiguous
};

at::Tensor flat_ids(const at::Tensor& t, int64_t b, int64_t l) {
  return t.detach().to(at::kLong).expand({b, l}).contiguous().view({b * l});
}

void check_range(const char* name, const at::Tensor& ids, int64_t rows) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  const int64_t* p = ids.const_data_ptr<int64_t>();
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < rows, "embedding_layernorm: ", name, " contains ",
                    lo < 0 ? lo : hi, ", out of range for a table of ", rows, " rows");
}

// A table whose rows are contiguous (inner stride 1), detached; copied only if it is not.
at::Tensor rows_of(const at::Tensor& t) {
  auto d = t.detach();
  return d.size(1) > 1 && d.stride(1) != 1 ? d.contiguous() : d;
}

struct Args {
  at::Tensor word, pos, tt, gamma, beta, proj;  // detached; tt/proj undefined when absent
  Ids ids;
  int64_t b, l, n, hidden;
  double eps;
};

Args prepare(const at::Tensor& input_ids, const at::Tensor& word_weight,
             const at::Tensor& position_ids, const at::Tensor& position_weight,
             const std::optional<at::Tensor>& token_type_ids,
             const std::optional<at::Tensor>& token_type_weight, const at::Tensor& ln_weight,
             const at::Tensor& ln_bias, double eps, const std::optional<at::Tensor>& word_proj) {
  const char* p = "embedding_layernorm (cpp): ";
  TORCH_CHECK(input_ids.device().is_cpu() && word_weight.device().is_cpu() &&
                  position_ids.device().is_cpu() && position_weight.device().is_cpu() &&
                  ln_weight.device().is_cpu() && ln_bias.device().is_cpu(),
              p, "every tensor must be on the CPU");
  TORCH_CHECK(input_ids.dim() == 2, p, "input_ids must be [batch, length]");
  TORCH_CHECK(token_type_ids.has_value() == token_type_weight.has_value(), p,
              "token_type_ids and token_type_weight must both be given or both be None");
  const auto dt = word_weight.scalar_type();
  const int64_t b = input_ids.size(0), l = input_ids.size(1);
  const int64_t hidden = ln_weight.numel();
  TORCH_CHECK(ln_weight.dim() == 1 && hidden > 0 && ln_bias.sizes() == ln_weight.sizes(), p,
              "ln_weight and ln_bias must be [hidden]");
  TORCH_CHECK(word_weight.dim() == 2 && position_weight.dim() == 2 &&
                  position_weight.size(1) == hidden,
              p, "word_weight and position_weight must be 2-D, position_weight [rows, hidden]");
  TORCH_CHECK(position_weight.scalar_type() == dt && ln_weight.scalar_type() == dt &&
                  ln_bias.scalar_type() == dt,
              p, "the weights must share a dtype");
  if (word_proj.has_value()) {
    TORCH_CHECK(word_proj->device().is_cpu() && word_proj->scalar_type() == dt, p,
                "word_proj must be a CPU tensor of the weights' dtype");
    TORCH_CHECK(word_proj->dim() == 2 && word_proj->size(0) == hidden &&
                    word_proj->size(1) == word_weight.size(1),
                p, "word_proj must be [hidden, rank] with rank = word_weight.shape[1]");
  } else {
    TORCH_CHECK(word_weight.size(1) == hidden, p, "word_weight must be [vocab, hidden]");
  }
  for (const auto* t : {&input_ids, &position_ids}) {
    TORCH_CHECK(t->scalar_type() == at::kLong || t->scalar_type() == at::kInt, p,
                "ids must be int64 or int32");
  }
  TORCH_CHECK(position_ids.dim() == 2 && position_ids.size(1) == l &&
                  (position_ids.size(0) == 1 || position_ids.size(0) == b),
              p, "position_ids must be [batch, length] or [1, length]");
  Args a;
  if (token_type_ids.has_value()) {
    const auto& t = *token_type_ids;
    TORCH_CHECK(t.device().is_cpu() && token_type_weight->device().is_cpu(), p,
                "every tensor must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, p,
                "ids must be int64 or int32");
    TORCH_CHECK(t.dim() == 2 && t.size(1) == l && (t.size(0) == 1 || t.size(0) == b), p,
                "token_type_ids must be [batch, length] or [1, length]");
    TORCH_CHECK(token_type_weight->dim() == 2 && token_type_weight->size(1) == hidden &&
                    token_type_weight->scalar_type() == dt,
                p, "token_type_weight must be [rows, hidden] of the weights' dtype");
    a.tt = rows_of(*token_type_weight);
    a.ids.tt = flat_ids(t, b, l);
  }
  a.b = b;
  a.l = l;
  a.n = b * l;
  a.hidden = hidden;
  a.eps = eps;
  a.word = rows_of(word_weight);
  a.pos = rows_of(position_weight);
  a.ids.ids = flat_ids(input_ids, b, l);
  a.ids.pos = flat_ids(position_ids, b, l);
  // One min/max per id tensor, in the reference's order.
  check_range("input_ids", a.ids.ids, a.word.size(0));
  check_range("position_ids", a.ids.pos, a.pos.size(0));
  if (a.tt.defined()) check_range("token_type_ids", a.ids.tt, a.tt.size(0));
  const auto acc = acc_type(dt);
  a.gamma = ln_weight.detach().to(acc).contiguous();
  a.beta = ln_bias.detach().to(acc).contiguous();
  if (word_proj.has_value()) a.proj = word_proj->detach();
  return a;
}

// The dtype the GEMMs of the factorized table run in: the tables' for fp32/bf16/fp64 (bf16 on
// oneDNN accumulates in fp32 and uses the CPU's bf16 dot products, as eager does), fp32 for fp16
// (no fast fp16 GEMM on CPUs without AVX512-FP16).
at::ScalarType gemm_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// The projected word rows word_weight[ids] @ word_proj^T ([N, hidden]) in gemm_type.
at::Tensor project(const Args& a) {
  const auto gdt = gemm_type(a.word.scalar_type());
  return linear_nt(at::index_select(a.word, 0, a.ids.ids).to(gdt), a.proj.to(gdt));
}

template <typename T, typename W, typename A>
Rows<T, W, A> make_rows(const Args& a, const W* word, int64_t word_ld, bool word_by_id) {
  Rows<T, W, A> r;
  r.ids = a.ids.ids.template const_data_ptr<int64_t>();
  r.pos_ids = a.ids.pos.template const_data_ptr<int64_t>();
  r.tt_ids = a.tt.defined() ? a.ids.tt.template const_data_ptr<int64_t>() : nullptr;
  r.word = word;
  r.word_ld = word_ld;
  r.word_by_id = word_by_id;
  r.pos = a.pos.template const_data_ptr<T>();
  r.pos_ld = a.pos.stride(0);
  r.tt = a.tt.defined() ? a.tt.template const_data_ptr<T>() : nullptr;
  r.tt_ld = a.tt.defined() ? a.tt.stride(0) : 0;
  r.hidden = a.hidden;
  return r;
}

int64_t token_grain(int64_t hidden) { return std::max<int64_t>(1, kGrainElems / hidden); }

// Runs f(rows) with the Rows of the word source: the table itself (dense) or the projected rows
// `proj_rows` ([N, hidden], dtype T or A).
template <typename T, typename F>
void with_rows(const Args& a, const at::Tensor& proj_rows, F&& f) {
  using A = typename Acc<T>::type;
  if (!proj_rows.defined()) {
    f(make_rows<T, T, A>(a, a.word.template const_data_ptr<T>(), a.word.stride(0), true));
  } else if (proj_rows.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    f(make_rows<T, T, A>(a, proj_rows.template const_data_ptr<T>(), a.hidden, false));
  } else {
    TORCH_CHECK(proj_rows.scalar_type() == c10::CppTypeToScalarType<A>::value,
                "embedding_layernorm: unexpected dtype of the word rows");
    f(make_rows<T, A, A>(a, proj_rows.template const_data_ptr<A>(), a.hidden, false));
  }
}

// ---- forward -----------------------------------------------------------------------------------
// Returns (out, mean, rstd, word rows); the last three only when train (else undefined).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const Args& a,
                                                                         bool train) {
  using A = typename Acc<T>::type;
  const auto opts = a.word.options();
  const auto acc_opts = opts.dtype(acc_type(a.word.scalar_type()));
  auto out = empty_output({a.b, a.l, a.hidden}, opts);
  at::Tensor mean, rstd, rows_out;
  if (train) {
    mean = empty_output({a.b, a.l}, acc_opts);
    rstd = empty_output({a.b, a.l}, acc_opts);
    rows_out = a.proj.defined() ? at::Tensor() : at::empty({0}, acc_opts);
  }
  if (a.n == 0) {
    if (train && a.proj.defined()) rows_out = empty_output({a.b, a.l, a.hidden}, acc_opts);
    return {out, mean, rstd, rows_out};
  }
  const auto rows = a.proj.defined() ? project(a).contiguous() : at::Tensor();
  const A* gamma = a.gamma.const_data_ptr<A>();
  const A* beta = a.beta.const_data_ptr<A>();
  T* o = out.mutable_data_ptr<T>();
  A* mu = train ? mean.mutable_data_ptr<A>() : nullptr;
  A* rs = train ? rstd.mutable_data_ptr<A>() : nullptr;
  const A eps = static_cast<A>(a.eps);
  with_rows<T>(a, rows, [&](const auto& r) {
    at::parallel_for(0, a.n, token_grain(a.hidden), [&](int64_t begin, int64_t end) {
      std::vector<A> buf(a.hidden);
      forward_rows(r, gamma, beta, eps, o, mu, rs, begin, end, buf.data());
    });
  });
  if (train && a.proj.defined()) rows_out = rows.to(acc_opts.dtype()).view({a.b, a.l, a.hidden});
  return {out, mean, rstd, rows_out};
}

// ---- backward ----------------------------------------------------------------------------------
// out[r] <- sum of the rows src[i] (i ascending) over the tokens i with ids[i] == r, in A; every
// other row, and the padding row, is zero. src: [N, width], row stride ld; out: [R, width] in T.
// One parallel pass writes every row once: the rows are cut into chunks of about equal work (a
// row costs its width, plus its width per token) and each chunk zeroes its empty rows and sums
// its tokens' rows. Tables with fewer distinct rows than 4 per thread (few token types) are
// zeroed first and their rows split into column blocks instead, so every thread has work.
template <typename T, typename A, typename S>
void table_grad(const S* src, int64_t ld, const at::Tensor& ids, std::optional<int64_t> padding,
                at::Tensor& out) {
  const int64_t rows = out.size(0), width = out.size(1), n = ids.numel();
  if (rows == 0 || width == 0) return;
  T* o = out.mutable_data_ptr<T>();
  const int64_t pad = padding.has_value() ? (*padding < 0 ? *padding + rows : *padding) : -1;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> order;  // (row, token), sorted
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] != pad) order.emplace_back(id[i], i);
  }
  std::sort(order.begin(), order.end());
  std::vector<int64_t> starts;  // where each distinct row's run of tokens starts, then the end
  for (int64_t k = 0; k < static_cast<int64_t>(order.size()); ++k) {
    if (k == 0 || order[k].first != order[k - 1].first) starts.push_back(k);
  }
  const int64_t distinct = static_cast<int64_t>(starts.size());
  starts.push_back(static_cast<int64_t>(order.size()));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());

  if (distinct > 0 && distinct < 4 * threads) {
    out.zero_();
    const int64_t parts = (4 * threads + distinct - 1) / distinct;
    const int64_t cb =
        std::min(width, std::max<int64_t>(64, ((width + parts - 1) / parts + 15) / 16 * 16));
    const int64_t col_blocks = (width + cb - 1) / cb;
    const int64_t per_task =
        std::max<int64_t>(1, static_cast<int64_t>(order.size()) * cb / distinct);
    at::parallel_for(0, distinct * col_blocks, std::max<int64_t>(1, kGrainElems / per_task),
                     [&](int64_t t0, int64_t t1) {
      std::vector<A> acc(cb);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t u = t / col_blocks, c0 = (t % col_blocks) * cb;
        const int64_t k0 = starts[u], k1 = starts[u + 1];
        gather_sum<T, S, A>(src + c0, ld, order.data() + k0, k1 - k0,
                            std::min(cb, width - c0), o + order[k0].first * width + c0,
                            acc.data());
      }
    });
    return;
  }

  // Chunk boundaries (rows) of about equal work.
  const int64_t total = (rows + static_cast<int64_t>(order.size())) * width;
  const int64_t chunks = std::clamp<int64_t>(total / kGrainElems, 1, std::min(rows, 8 * threads));
  std::vector<int64_t> bounds{0};
  {
    int64_t done = 0, u = 0;
    for (int64_t r = 0; r < rows && static_cast<int64_t>(bounds.size()) < chunks; ++r) {
      done += width;
      if (u < distinct && order[starts[u]].first == r) {
        done += width * (starts[u + 1] - starts[u]);
        ++u;
      }
      if (done * chunks >= total * static_cast<int64_t>(bounds.size())) bounds.push_back(r + 1);
    }
    bounds.push_back(rows);
  }
  const int64_t nb = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, nb, 1, [&](int64_t c0, int64_t c1) {
    std::vector<A> acc(width);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = bounds[c], r1 = bounds[c + 1];
      if (r0 >= r1) continue;
      // The first distinct row at or after r0.
      int64_t u = std::lower_bound(starts.begin(), starts.end() - 1, r0,
                                   [&](int64_t k, int64_t row) { return order[k].first < row; }) -
                  starts.begin();
      int64_t r = r0;
      while (r < r1) {
        const int64_t next = u < distinct ? std::min(r1, order[starts[u]].first) : r1;
        if (next > r) {  // rows without tokens: zero (all-zero bits in every float dtype)
          std::memset(static_cast<void*>(o + r * width), 0, (next - r) * width * sizeof(T));
          r = next;
          continue;
        }
        const int64_t k0 = starts[u], k1 = starts[u + 1];
        gather_sum<T, S, A>(src, ld, order.data() + k0, k1 - k0, width, o + r * width,
                            acc.data());
        ++u;
        ++r;
      }
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const Args& a, std::optional<int64_t> padding_idx,
    std::optional<int64_t> position_padding_idx, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& word) {
  using A = typename Acc<T>::type;
  const auto opts = a.word.options();
  const auto acc_dtype = acc_type(a.word.scalar_type());
  const auto acc_opts = opts.dtype(acc_dtype);
  const int64_t n = a.n, h = a.hidden;
  TORCH_CHECK(grad.scalar_type() == a.word.scalar_type() && grad.numel() == n * h,
              "embedding_layernorm backward: grad must be [batch, length, hidden] of the weights' "
              "dtype");
  const bool stats = mean.has_value() && rstd.has_value() && mean->defined() && rstd->defined();
  at::Tensor mean_c, rstd_c;
  if (stats) {
    TORCH_CHECK(mean->numel() == n && rstd->numel() == n,
                "embedding_layernorm backward: mean and rstd must be [batch, length]");
    mean_c = mean->detach().to(acc_dtype).contiguous();
    rstd_c = rstd->detach().to(acc_dtype).contiguous();
  }
  // The word rows of x: the table (dense), the kept projected rows, or recomputed ones.
  at::Tensor rows;
  if (a.proj.defined() && n > 0) {
    if (word.has_value() && word->defined() && word->numel() > 0) {
      TORCH_CHECK(word->numel() == n * h,
                  "embedding_layernorm backward: word must be [batch, length, hidden]");
      rows = word->detach().to(acc_dtype).contiguous();
    } else {
      rows = project(a).contiguous();
    }
  }
  const auto g2d = grad.detach().contiguous();
  auto dx = empty_output({n, h}, acc_opts);
  // The factorized table's GEMMs take dx in their dtype: bf16 gets its copy from the row pass.
  const auto gdt = gemm_type(a.word.scalar_type());
  const bool low_copy = a.proj.defined() && gdt != acc_dtype;
  auto dx_low = low_copy ? empty_output({n, h}, opts) : at::Tensor();
  // The factorized table's rows of the tokens (for d_proj), gathered by the row pass.
  const int64_t rank = a.word.size(1);
  auto gathered = a.proj.defined() ? at::empty({n, rank}, opts) : at::Tensor();
  // Few token types (BERT: 2): their gradient is summed per block in the row pass too, which
  // saves a pass over dx; more go through table_grad like the other tables.
  const int64_t tt_rows = a.tt.defined() ? a.tt.size(0) : 0;
  const bool tt_in_pass = a.tt.defined() && tt_rows <= kMaxFusedTokenTypes;
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  const int64_t part_stride = (2 + (tt_in_pass ? tt_rows : 0)) * h;
  auto partial = at::empty({std::max<int64_t>(blocks, 1) * part_stride}, acc_opts);
  const A* gamma = a.gamma.const_data_ptr<A>();
  const A eps = static_cast<A>(a.eps);
  A* dxp = dx.mutable_data_ptr<A>();
  T* dxl = low_copy ? dx_low.mutable_data_ptr<T>() : nullptr;
  A* part = partial.mutable_data_ptr<A>();
  const T* gp = g2d.const_data_ptr<T>();
  const A* mu = stats ? mean_c.const_data_ptr<A>() : nullptr;
  const A* rs = stats ? rstd_c.const_data_ptr<A>() : nullptr;
  if (n > 0) {
    with_rows<T>(a, rows, [&](const auto& r) {
      const int64_t grain = std::max<int64_t>(1, token_grain(h) / kBlockRows);
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        std::vector<A> buf(h), g(h);
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t begin = blk * kBlockRows, end = std::min(n, begin + kBlockRows);
          A* pg = part + blk * part_stride;
          backward_rows(r, gp, gamma, eps, mu, rs, dxp, dxl, pg, pg + h,
                        tt_in_pass ? pg + 2 * h : nullptr, tt_rows, a.word.const_data_ptr<T>(),
                        a.word.stride(0), rank,
                        gathered.defined() ? gathered.mutable_data_ptr<T>() : nullptr, begin,
                        end, buf.data(), g.data());
        }
      });
    });
  }
  // ln_weight, ln_bias (and the fused token types): the block sums added in block order.
  auto d_gamma = empty_output({h}, opts), d_beta = empty_output({h}, opts);
  at::Tensor d_tt = a.tt.defined() ? empty_output(a.tt.sizes(), opts) : at::empty({0}, opts);
  {
    const int64_t outs = 2 + (tt_in_pass ? tt_rows : 0);
    T* dg = d_gamma.mutable_data_ptr<T>();
    T* db = d_beta.mutable_data_ptr<T>();
    T* dt = tt_in_pass ? d_tt.mutable_data_ptr<T>() : nullptr;
    const int64_t used_blocks = n > 0 ? blocks : 0;
    // Small (blocks x outputs x hidden additions): on the calling thread unless it is large.
    at::parallel_for(0, outs * h,
                     std::max<int64_t>(64, (kGrainElems * 32) / std::max<int64_t>(1, used_blocks)),
                     [&](int64_t c0, int64_t c1) {
      std::vector<A> sum(c1 - c0, A(0));
      for (int64_t blk = 0; blk < used_blocks; ++blk) {
        const A* pp = part + blk * part_stride;
        for (int64_t c = c0; c < c1; ++c) sum[c - c0] += pp[c];
      }
      for (int64_t c = c0; c < c1; ++c) {
        T* dst = c < h ? dg + c : c < 2 * h ? db + (c - h) : dt + (c - 2 * h);
        store(dst, 0, sum[c - c0]);
      }
    });
  }
  auto d_pos = empty_output(a.pos.sizes(), opts);
  table_grad<T, A, A>(dxp, h, a.ids.pos, position_padding_idx, d_pos);
  if (a.tt.defined() && !tt_in_pass) {
    table_grad<T, A, A>(dxp, h, a.ids.tt, std::nullopt, d_tt);
  }
  auto d_word = empty_output(a.word.sizes(), opts);
  at::Tensor d_proj = at::empty({0}, opts);
  if (a.proj.defined()) {
    d_proj = empty_output(a.proj.sizes(), opts);
    if (n == 0) {
      d_proj.zero_();
      d_word.zero_();
    } else {
      // dG = dx @ word_proj ([N, E]) summed into the word table; d_proj = dx^T @ word_weight[ids].
      // GEMM dtypes as in the forward: bf16 stays bf16 (oneDNN accumulates in fp32), fp16 runs
      // in fp32.
      const auto dx_g = low_copy ? dx_low : dx;
      const auto g = gathered.to(gdt);
      const auto dg = onednn::mm_nt(dx_g, a.proj.to(gdt).t());
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gdt, "embedding_layernorm_dg", [&] {
        table_grad<T, A, scalar_t>(dg.const_data_ptr<scalar_t>(), dg.stride(0), a.ids.ids,
                                   padding_idx, d_word);
      });
      if (gdt == at::kFloat) {
        d_proj.copy_(onednn::mm_nt(dx_g.t(), g.t()));
      } else {
        at::mm_out(d_proj, dx_g.t(), g);
      }
    }
  } else {
    table_grad<T, A, A>(dxp, h, a.ids.ids, padding_idx, d_word);
  }
  return {d_word, d_proj, d_pos, d_tt, d_gamma, d_beta};
}

// ---- entry points ------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_entry(
    const at::Tensor& input_ids, const at::Tensor& word_weight, const at::Tensor& position_ids,
    const at::Tensor& position_weight, const std::optional<at::Tensor>& token_type_ids,
    const std::optional<at::Tensor>& token_type_weight, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, const std::optional<at::Tensor>& word_proj,
    bool train) {
  // Kernels compute; autograd is the op's business (rosita_fast/ops/embedding_layernorm.py).
  // Worker threads of at::parallel_for do not inherit this guard: the kernels use detached views.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  // The op takes no autocast (see embedding_layernorm's docstring): neither do its GEMMs.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto a = prepare(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                         token_type_weight, ln_weight, ln_bias, eps, word_proj);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word_weight.scalar_type(),
                                  "embedding_layernorm_fwd",
                                  [&] { res = forward_impl<scalar_t>(a, train); });
  return res;
}

at::Tensor embedding_layernorm_fwd(
    const at::Tensor& input_ids, const at::Tensor& word_weight, const at::Tensor& position_ids,
    const at::Tensor& position_weight, const std::optional<at::Tensor>& token_type_ids,
    const std::optional<at::Tensor>& token_type_weight, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, const std::optional<at::Tensor>& word_proj,
    std::optional<int64_t> /*padding_idx*/, std::optional<int64_t> /*position_padding_idx*/) {
  return std::get<0>(forward_entry(input_ids, word_weight, position_ids, position_weight,
                                   token_type_ids, token_type_weight, ln_weight, ln_bias, eps,
                                   word_proj, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_layernorm_train_fwd(
    const at::Tensor& input_ids, const at::Tensor& word_weight, const at::Tensor& position_ids,
    const at::Tensor& position_weight, const std::optional<at::Tensor>& token_type_ids,
    const std::optional<at::Tensor>& token_type_weight, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, const std::optional<at::Tensor>& word_proj,
    std::optional<int64_t> /*padding_idx*/, std::optional<int64_t> /*position_padding_idx*/) {
  return forward_entry(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                       token_type_weight, ln_weight, ln_bias, eps, word_proj, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
embedding_layernorm_bwd(const at::Tensor& grad, const at::Tensor& input_ids,
                        const at::Tensor& word_weight, const at::Tensor& position_ids,
                        const at::Tensor& position_weight,
                        const std::optional<at::Tensor>& token_type_ids,
                        const std::optional<at::Tensor>& token_type_weight,
                        const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                        const std::optional<at::Tensor>& word_proj,
                        std::optional<int64_t> padding_idx,
                        std::optional<int64_t> position_padding_idx,
                        const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& rstd,
                        const std::optional<at::Tensor>& word) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto a = prepare(input_ids, word_weight, position_ids, position_weight, token_type_ids,
                         token_type_weight, ln_weight, ln_bias, eps, word_proj);
  TORCH_CHECK(grad.device().is_cpu(), "embedding_layernorm backward: grad must be on the CPU");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word_weight.scalar_type(),
                                  "embedding_layernorm_bwd", [&] {
                                    res = backward_impl<scalar_t>(grad, a, padding_idx,
                                                                  position_padding_idx, mean,
                                                                  rstd, word);
                                  });
  return res;
}

}  // namespace

#define ELN_ARGS                                                                                \
  "Tensor input_ids, Tensor word_weight, Tensor position_ids, Tensor position_weight, "         \
  "Tensor? token_type_ids, Tensor? token_type_weight, Tensor ln_weight, Tensor ln_bias, "       \
  "float eps, Tensor? word_proj=None, int? padding_idx=None, int? position_padding_idx=None"

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("embedding_layernorm_cpp(" ELN_ARGS ") -> Tensor");
  m.def("embedding_layernorm_train_cpp(" ELN_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("embedding_layernorm_backward_cpp(Tensor grad, " ELN_ARGS
        ", Tensor? mean=None, Tensor? rstd=None, Tensor? word=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("embedding_layernorm_cpp", &embedding_layernorm_fwd);
  m.impl("embedding_layernorm_train_cpp", &embedding_layernorm_train_fwd);
  m.impl("embedding_layernorm_backward_cpp", &embedding_layernorm_bwd);
}

}  // namespace rosita_fast
