// C++ CPU kernels for multi-head attention:
// out = dropout(softmax(scale * q k^T + bias, masked keys)) v.
//
// Forward: one work item per (batch, head, block of kBlockM query rows); at::parallel_for spreads
// all items of a call over the threads jointly, so two heads at batch 1 still keep two cores busy.
// An item keeps its query block, output accumulator and running row max / sum in per-thread
// scratch and sweeps the keys in blocks of kBlockN with an online softmax (the running output is
// rescaled whenever a block raises a row's max), so the [B, H, Lq, Lk] scores never exist. The
// training forward also writes lse = log-sum-exp of each row's scores (-inf for a row with no key
// left), from which the backward recomputes the probabilities.
//
// Backward (flash-attention decomposition, two passes, both recomputing P = exp(S - lse) and
// delta = rowsum(dO * O) for the query rows they touch; dP = dO V^T, dS = P (dP - delta)):
// pass 1, items over (batch, head, query block), accumulates dQ = scale dS K and writes dS as the
// full-shape bias gradient when asked; pass 2, items over (batch, head, key block), accumulates
// dV = P^T dO and dK = scale dS^T Q. The items of both passes are independent and interleaved in
// one parallel region (a region costs a thread wake-up; the static split of the interleaved range
// gives every thread a share of both kinds).
//
// Inputs are read in place through their strides (q/k/v are usually transposed views of a fused
// [B, L, 3, H, D] projection); each block is converted once into the accumulation type (fp32;
// fp64 for fp64) in scratch, K and V transposed where a product needs them so. The block products
// are register-blocked micro-kernels on GCC vector types (rows x vectors of accumulators, FMA per
// key or feature), compiled for the baseline ISA, AVX2+FMA and AVX-512 and picked per call from
// the running CPU (ROSITA_FAST_ATTENTION_ISA=baseline|avx2|avx512 caps the choice: a test hook
// that lets one machine run every variant). Softmax exponentials use the vectorizable polynomial
// exp of epilogue.h (fp64 keeps libm's).
//
// Dropout (training forward and backward, dropout_p > 0): the counter-based hash of dropout.h
// (bit for bit rosita_fast/ops/_dropout.py) decides each probability of (b, h, query i, key j)
// from (seed, row (b H + h) Lq + i, column j); Z = keep * scale. The forward multiplies the
// probability tile by Z before its product with V, while the running row sum l (hence lse) stays
// the undropped softmax's; the backward regenerates Z: dV = (P Z)^T dO, dP = (dO V^T) Z,
// dS = P (dP - delta) (delta = rowsum(dO O) is still rowsum(P dP) for the dropped output O). A
// row's hash key is computed once per item (per query block in pass 2), the factors of a block row
// in a small loop of integer ops the compiler vectorizes; without dropout none of it runs.
//
// Outputs (out, dq, dk, dv) are [B, H, L, D] views of [B, L, H, D] memory, allocated with
// empty_output (NaN while tests poison outputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/dropout.h"
#include "rosita_fast/epilogue.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

constexpr int64_t kBlockM = 64;  // query rows per block
constexpr int64_t kBlockN = 64;  // keys per block
constexpr int64_t kMinHead = 8, kMaxHead = 128;


// ---- vector types and the ISA variants ----------------------------------------------------------

template <typename T, int Bytes> struct VecOf;
template <> struct VecOf<float, 16> { typedef float type __attribute__((vector_size(16))); };
template <> struct VecOf<float, 32> { typedef float type __attribute__((vector_size(32))); };
template <> struct VecOf<float, 64> { typedef float type __attribute__((vector_size(64))); };
template <> struct VecOf<double, 16> { typedef double type __attribute__((vector_size(16))); };
template <> struct VecOf<double, 32> { typedef double type __attribute__((vector_size(32))); };
template <> struct VecOf<double, 64> { typedef double type __attribute__((vector_size(64))); };

// kBytes: vector width; kRows x kCols: the micro-kernel's accumulator tile (rows x vectors), sized
// to the register file (AVX-512: 16 of 32 zmm; AVX2/baseline: 8 of 16 ymm/xmm).
struct Baseline { static constexpr int kBytes = 16, kRows = 4, kCols = 2; };
struct Avx2 { static constexpr int kBytes = 32, kRows = 4, kCols = 2; };
struct Avx512 { static constexpr int kBytes = 64, kRows = 4, kCols = 4; };

// Scratch rows are padded to 64 bytes (a multiple of every variant's vector).
template <typename acc_t> constexpr int64_t kPad = 64 / static_cast<int64_t>(sizeof(acc_t));

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// c[r, :] (+)= sum_k a[r, k] * b[k, :] for R rows and C vectors of columns, accumulators in
// registers. Row-major operands with leading dimensions lda, ldb, ldc (in elements).
template <typename T, int Bytes, int R, int C>
ROSITA_ALWAYS_INLINE void micro_kernel(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t depth, T* c,
                             int64_t ldc, bool accumulate) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int W = Bytes / static_cast<int>(sizeof(T));
  V acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) {
      if (accumulate) {
        std::memcpy(&acc[r][j], c + r * ldc + j * W, sizeof(V));
      } else {
        acc[r][j] = V{};
      }
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    V bv[C];
    for (int j = 0; j < C; ++j) std::memcpy(&bv[j], b + k * ldb + j * W, sizeof(V));
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * lda + k];
      for (int j = 0; j < C; ++j) acc[r][j] += ar * bv[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) std::memcpy(c + r * ldc + j * W, &acc[r][j], sizeof(V));
  }
}

template <typename T, class Isa, int R>
ROSITA_ALWAYS_INLINE void gemm_rows(int64_t vectors, int64_t depth, const T* a, int64_t lda, const T* b,
                          int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  constexpr int C = Isa::kCols;
  int64_t j = 0;
  for (; j + C <= vectors; j += C) {
    micro_kernel<T, Isa::kBytes, R, C>(a, lda, b + j * W, ldb, depth, c + j * W, ldc, accumulate);
  }
  const int64_t left = vectors - j;
  if (left == 3) {
    if constexpr (C > 3) {
      micro_kernel<T, Isa::kBytes, R, 3>(a, lda, b + j * W, ldb, depth, c + j * W, ldc, accumulate);
    }
  } else if (left == 2) {
    if constexpr (C > 2) {
      micro_kernel<T, Isa::kBytes, R, 2>(a, lda, b + j * W, ldb, depth, c + j * W, ldc, accumulate);
    }
  } else if (left == 1) {
    micro_kernel<T, Isa::kBytes, R, 1>(a, lda, b + j * W, ldb, depth, c + j * W, ldc, accumulate);
  }
}

// c[m x n] (+)= a[m x depth] * b[depth x n], row-major; n a multiple of kPad<T>.
template <typename T, class Isa>
ROSITA_ALWAYS_INLINE void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t lda, const T* b,
                     int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  static_assert(Isa::kRows == 4, "the row tail below assumes 4-row tiles");
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  const int64_t vectors = n / W;
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) {
    gemm_rows<T, Isa, 4>(vectors, depth, a + r * lda, lda, b, ldb, c + r * ldc, ldc, accumulate);
  }
  switch (m - r) {
    case 3:
      gemm_rows<T, Isa, 3>(vectors, depth, a + r * lda, lda, b, ldb, c + r * ldc, ldc, accumulate);
      break;
    case 2:
      gemm_rows<T, Isa, 2>(vectors, depth, a + r * lda, lda, b, ldb, c + r * ldc, ldc, accumulate);
      break;
    case 1:
      gemm_rows<T, Isa, 1>(vectors, depth, a + r * lda, lda, b, ldb, c + r * ldc, ldc, accumulate);
      break;
    default:
      break;
  }
}

// ---- element-wise pieces ------------------------------------------------------------------------

// exp(x), exactly 0 for x = -inf (and below the float range), NaN for NaN. The float form is
// epilogue.h's vectorizable polynomial, whose clamp would otherwise turn -inf into exp(-87).
ROSITA_ALWAYS_INLINE float exp_or_zero(float x) {
  const float e = fast_expf(x);
  return x < -87.0f ? 0.0f : (x != x ? x : e);
}
ROSITA_ALWAYS_INLINE double exp_or_zero(double x) { return std::exp(x); }

template <typename acc_t> constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// dst[0, n) = mul * src[0, stride, 2 stride, ...], converted to the accumulation type.
template <typename acc_t, typename src_t>
ROSITA_ALWAYS_INLINE void load_row(acc_t* dst, const src_t* src, int64_t n, int64_t stride, acc_t mul) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * mul;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * stride]) * mul;
  }
}

template <typename acc_t, typename src_t>
ROSITA_ALWAYS_INLINE void add_row(acc_t* dst, const src_t* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<acc_t>(src[i * stride]);
  }
}

template <typename acc_t> ROSITA_ALWAYS_INLINE void zero(acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = acc_t(0);
}

// A [rows x D] block of a [B, H, L, D] tensor into scratch, times mul:
// row-major  dst[r * ld + d] (columns D..ld zeroed, rows rows..rows_pad zeroed), or
// transposed dst[d * ld + r]  (columns rows..rows_pad zeroed).
struct Tile {
  int64_t rows, rows_pad, D;
};

template <typename acc_t, typename src_t>
ROSITA_ALWAYS_INLINE void load_rows(acc_t* dst, int64_t ld, const src_t* src, int64_t row_stride,
                          int64_t col_stride, const Tile& t, acc_t mul) {
  for (int64_t r = 0; r < t.rows; ++r) {
    load_row(dst + r * ld, src + r * row_stride, t.D, col_stride, mul);
    zero(dst + r * ld + t.D, ld - t.D);
  }
  for (int64_t r = t.rows; r < t.rows_pad; ++r) zero(dst + r * ld, ld);
}

template <typename acc_t, typename src_t>
ROSITA_ALWAYS_INLINE void load_transposed(acc_t* dst, int64_t ld, acc_t* row_buf, const src_t* src,
                                int64_t row_stride, int64_t col_stride, const Tile& t, acc_t mul) {
  for (int64_t r = 0; r < t.rows; ++r) {
    load_row(row_buf, src + r * row_stride, t.D, col_stride, mul);
    for (int64_t d = 0; d < t.D; ++d) dst[d * ld + r] = row_buf[d];
  }
  for (int64_t d = 0; d < t.D; ++d) zero(dst + d * ld + t.rows, t.rows_pad - t.rows);
}

// ---- call arguments -----------------------------------------------------------------------------

// A [B, H, L, D]-indexed tensor: data pointer and the four strides (in elements).
template <typename T> struct View4 {
  T* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  T* at(int64_t b, int64_t h, int64_t i) const { return ptr + b * s0 + h * s1 + i * s2; }
};

template <typename T> View4<const T> view4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t> struct Args {
  using acc_t = typename AccType<scalar_t>::type;
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  acc_t scale = 1;
  View4<const scalar_t> q, k, v;
  const bool* mask = nullptr;  // [B, Lk], true = attend
  int64_t ms0 = 0, ms1 = 0;
  // bias expanded to [B, H, Lq, Lk] (stride 0 along broadcast dims), in scalar_t or float
  View4<const scalar_t> bias;
  View4<const float> bias_f32;
  // forward
  View4<scalar_t> out;
  acc_t* lse_out = nullptr;  // contiguous [B, H, Lq] or null
  // backward
  View4<const scalar_t> grad, o;
  View4<const acc_t> lse;  // [B, H, Lq] (s3 unused)
  View4<scalar_t> dq, dk, dv;
  acc_t* dbias = nullptr;  // contiguous [B, H, Lq, Lk] or null

  bool has_bias() const { return bias.ptr != nullptr || bias_f32.ptr != nullptr; }
  // row[0, n) += bias[b, h, i, j0 + 0..n) (or, transposed, bias[b, h, i0 + 0..n, j])
  ROSITA_ALWAYS_INLINE void add_bias(acc_t* row, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j,
                           bool along_queries) const {
    if (bias_f32.ptr != nullptr) {
      const float* p = bias_f32.at(b, h, i) + j * bias_f32.s3;
      add_row(row, p, n, along_queries ? bias_f32.s2 : bias_f32.s3);
    } else {
      const scalar_t* p = bias.at(b, h, i) + j * bias.s3;
      add_row(row, p, n, along_queries ? bias.s2 : bias.s3);
    }
  }
  bool keep(int64_t b, int64_t j) const { return mask == nullptr || mask[b * ms0 + j * ms1]; }

  // dropout (training, p > 0): Z = keep * drop_scale, the keep decision a hash of
  // (drop_seed, row (b H + h) Lq + i, column j)
  bool dropout = false;
  uint32_t drop_seed = 0, drop_threshold = 0;
  acc_t drop_scale = 1;
  uint32_t drop_key(int64_t b, int64_t h, int64_t i) const {
    return dropout::row_key(drop_seed, (b * H + h) * Lq + i);
  }
  // z[0, n) = Z of the row with key `key` at columns j0 + 0..n.
  ROSITA_ALWAYS_INLINE void drop_row(acc_t* z, uint32_t key, int64_t j0, int64_t n) const {
    const uint32_t thr = drop_threshold;
    const acc_t sc = drop_scale;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = dropout::keep(key, j0 + j, thr) ? sc : acc_t(0);
  }
  // z[0, n) = Z of the rows with keys key[0, n) at column j.
  ROSITA_ALWAYS_INLINE void drop_column(acc_t* z, const uint32_t* key, int64_t j, int64_t n) const {
    const uint32_t thr = drop_threshold;
    const acc_t sc = drop_scale;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = dropout::keep(key[i], j, thr) ? sc : acc_t(0);
  }
};

// ---- forward ------------------------------------------------------------------------------------

template <typename scalar_t, class Isa>
ROSITA_ALWAYS_INLINE void forward_items(const Args<scalar_t>& a, int64_t t0, int64_t t1) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int64_t BM = kBlockM, BN = kBlockN, P = kPad<acc_t>;
  const int64_t D = a.D, Dp = round_up(D, P), nqb = (a.Lq + BM - 1) / BM;
  std::vector<acc_t> buf(BM * Dp + Dp * BN + BN * Dp + BM * BN + BM * Dp + 3 * BM + Dp);
  acc_t* qs = buf.data();      // [BM, Dp] scale * q
  acc_t* kt = qs + BM * Dp;    // [D, BN]  k^T
  acc_t* vr = kt + Dp * BN;    // [BN, Dp] v
  acc_t* s = vr + BN * Dp;     // [BM, BN] scores, then probabilities
  acc_t* o = s + BM * BN;      // [BM, Dp] output accumulator
  acc_t* m = o + BM * Dp;      // [BM] running row max
  acc_t* l = m + BM;           // [BM] running row sum
  acc_t* corr = l + BM;        // [BM] rescale factor of this key block
  acc_t* row_buf = corr + BM;  // [Dp]
  bool keep[BN];
  acc_t z[BN];        // dropout factors of one block row
  uint32_t dkey[BM];  // the rows' dropout keys
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (a.H * nqb), h = (t / nqb) % a.H, i0 = (t % nqb) * BM;
    const int64_t rows = std::min(BM, a.Lq - i0);
    if (a.dropout) {
      for (int64_t r = 0; r < rows; ++r) dkey[r] = a.drop_key(b, h, i0 + r);
    }
    load_rows(qs, Dp, a.q.at(b, h, i0), a.q.s2, a.q.s3, Tile{rows, rows, D}, a.scale);
    zero(o, rows * Dp);
    for (int64_t r = 0; r < rows; ++r) {
      m[r] = kNegInf<acc_t>;
      l[r] = 0;
    }
    for (int64_t j0 = 0; j0 < a.Lk; j0 += BN) {
      const int64_t n = std::min(BN, a.Lk - j0), npad = round_up(n, P);
      bool any = false;
      for (int64_t j = 0; j < n; ++j) any |= keep[j] = a.keep(b, j0 + j);
      if (!any) continue;  // every key of the block masked: nothing to add
      const Tile kv{n, npad, D};
      load_transposed(kt, BN, row_buf, a.k.at(b, h, j0), a.k.s2, a.k.s3, kv, acc_t(1));
      load_rows(vr, Dp, a.v.at(b, h, j0), a.v.s2, a.v.s3, kv, acc_t(1));
      gemm<acc_t, Isa>(rows, npad, D, qs, Dp, kt, BN, s, BN, false);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* row = s + r * BN;
        if (a.has_bias()) a.add_bias(row, n, b, h, i0 + r, j0, false);
        for (int64_t j = 0; j < n; ++j) row[j] = keep[j] ? row[j] : kNegInf<acc_t>;
        for (int64_t j = n; j < npad; ++j) row[j] = kNegInf<acc_t>;
        acc_t mx = kNegInf<acc_t>;
        int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
        for (int64_t j = 0; j < npad; ++j) {
          mx = row[j] > mx ? row[j] : mx;
          nan |= row[j] != row[j];
        }
        // A NaN score makes the row NaN (as in the reference), not a skipped key.
        const acc_t m_new = nan != 0 || m[r] != m[r] ? std::numeric_limits<acc_t>::quiet_NaN()
                                                     : std::max(m[r], mx);
        if (m_new == kNegInf<acc_t>) {  // no key of this row left so far
          zero(row, npad);
          corr[r] = 1;
          continue;
        }
        corr[r] = exp_or_zero(m[r] - m_new);
        acc_t sum = 0;
        if (a.dropout) {
          // The sum (the softmax's denominator) is of the undropped probabilities; the tile
          // multiplied into V is P Z. Padding columns have p = 0: their factors only need to be
          // finite.
          a.drop_row(z, dkey[r], j0, npad);
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < npad; ++j) {
            const acc_t p = exp_or_zero(row[j] - m_new);
            row[j] = p * z[j];
            sum += p;
          }
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < npad; ++j) {
            const acc_t p = exp_or_zero(row[j] - m_new);
            row[j] = p;
            sum += p;
          }
        }
        l[r] = l[r] * corr[r] + sum;
        m[r] = m_new;
        if (corr[r] != acc_t(1)) {
          acc_t* orow = o + r * Dp;
          const acc_t c = corr[r];
          for (int64_t d = 0; d < Dp; ++d) orow[d] *= c;
        }
      }
      gemm<acc_t, Isa>(rows, Dp, npad, s, BN, vr, Dp, o, Dp, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      // l = 0: no key left, the row is 0 (and lse -inf); a NaN l carries NaN through.
      const acc_t inv = l[r] == acc_t(0) ? acc_t(0) : acc_t(1) / l[r];
      scalar_t* dst = a.out.at(b, h, i0 + r);
      const acc_t* orow = o + r * Dp;
      for (int64_t d = 0; d < D; ++d) dst[d * a.out.s3] = static_cast<scalar_t>(orow[d] * inv);
      if (a.lse_out != nullptr) {
        a.lse_out[(b * a.H + h) * a.Lq + i0 + r] =
            l[r] == acc_t(0) ? kNegInf<acc_t> : m[r] + std::log(l[r]);
      }
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

// delta[r] = sum_d dO[r, d] O[r, d] for the rows of a query block; dO is already in scratch.
template <typename scalar_t, typename acc_t>
ROSITA_ALWAYS_INLINE void block_delta(const Args<scalar_t>& a, int64_t b, int64_t h, int64_t i0,
                            int64_t rows, const acc_t* dor, int64_t ld, acc_t* row_buf,
                            acc_t* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    load_row(row_buf, a.o.at(b, h, i0 + r), a.D, a.o.s3, acc_t(1));
    const acc_t* g = dor + r * ld;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < a.D; ++d) sum += g[d] * row_buf[d];
    delta[r] = sum;
  }
}

int64_t dq_scratch(int64_t Dp) {
  return 3 * kBlockM * Dp + 3 * Dp * kBlockN + 2 * kBlockM * kBlockN + 2 * kBlockM + Dp;
}
int64_t dkv_scratch(int64_t Dp) {
  return 4 * kBlockN * Dp + 2 * Dp * kBlockM + 2 * kBlockM * Dp + 3 * kBlockN * kBlockM +
         2 * kBlockM + Dp;
}

// Pass 1, one item per (batch, head, query block): dQ = scale dS K and, when asked, the full-shape
// bias gradient dS.
template <typename scalar_t, class Isa>
ROSITA_ALWAYS_INLINE void backward_dq_item(const Args<scalar_t>& a, typename AccType<scalar_t>::type* buf,
                                 int64_t t) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int64_t BM = kBlockM, BN = kBlockN, P = kPad<acc_t>;
  const int64_t D = a.D, Dp = round_up(D, P), nqb = (a.Lq + BM - 1) / BM;
  acc_t* qs = buf;              // [BM, Dp] scale * q
  acc_t* dor = qs + BM * Dp;    // [BM, Dp] dO
  acc_t* dqa = dor + BM * Dp;   // [BM, Dp] dQ / scale accumulator
  acc_t* kt = dqa + BM * Dp;    // [D, BN]  k^T
  acc_t* vt = kt + Dp * BN;     // [D, BN]  v^T
  acc_t* kr = vt + Dp * BN;     // [BN, Dp] k
  acc_t* s = kr + BN * Dp;      // [BM, BN] scores, then dS
  acc_t* dp = s + BM * BN;      // [BM, BN] dP
  acc_t* lse = dp + BM * BN;    // [BM]
  acc_t* delta = lse + BM;      // [BM]
  acc_t* row_buf = delta + BM;  // [Dp]
  bool keep[BN];
  acc_t z[BN];        // dropout factors of one block row
  uint32_t dkey[BM];  // the rows' dropout keys
  const int64_t b = t / (a.H * nqb), h = (t / nqb) % a.H, i0 = (t % nqb) * BM;
  const int64_t rows = std::min(BM, a.Lq - i0);
  if (a.dropout) {
    for (int64_t r = 0; r < rows; ++r) dkey[r] = a.drop_key(b, h, i0 + r);
  }
  const Tile qtile{rows, rows, D};
  load_rows(qs, Dp, a.q.at(b, h, i0), a.q.s2, a.q.s3, qtile, a.scale);
  load_rows(dor, Dp, a.grad.at(b, h, i0), a.grad.s2, a.grad.s3, qtile, acc_t(1));
  block_delta(a, b, h, i0, rows, dor, Dp, row_buf, delta);
  for (int64_t r = 0; r < rows; ++r) lse[r] = *a.lse.at(b, h, i0 + r);
  zero(dqa, rows * Dp);
  acc_t* dbias = a.dbias == nullptr ? nullptr : a.dbias + ((b * a.H + h) * a.Lq + i0) * a.Lk;
  for (int64_t j0 = 0; j0 < a.Lk; j0 += BN) {
    const int64_t n = std::min(BN, a.Lk - j0), npad = round_up(n, P);
    bool any = false;
    for (int64_t j = 0; j < n; ++j) any |= keep[j] = a.keep(b, j0 + j);
    if (!any) {  // every key of the block masked: P = dS = 0
      if (dbias != nullptr) {
        for (int64_t r = 0; r < rows; ++r) zero(dbias + r * a.Lk + j0, n);
      }
      continue;
    }
    const Tile kv{n, npad, D};
    load_transposed(kt, BN, row_buf, a.k.at(b, h, j0), a.k.s2, a.k.s3, kv, acc_t(1));
    load_transposed(vt, BN, row_buf, a.v.at(b, h, j0), a.v.s2, a.v.s3, kv, acc_t(1));
    load_rows(kr, Dp, a.k.at(b, h, j0), a.k.s2, a.k.s3, kv, acc_t(1));
    gemm<acc_t, Isa>(rows, npad, D, qs, Dp, kt, BN, s, BN, false);
    gemm<acc_t, Isa>(rows, npad, D, dor, Dp, vt, BN, dp, BN, false);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* row = s + r * BN;
      const acc_t* dprow = dp + r * BN;
      if (lse[r] == kNegInf<acc_t>) {  // no key left in this row: P = dS = 0
        zero(row, npad);
      } else {
        if (a.has_bias()) a.add_bias(row, n, b, h, i0 + r, j0, false);
        for (int64_t j = 0; j < n; ++j) row[j] = keep[j] ? row[j] : kNegInf<acc_t>;
        for (int64_t j = n; j < npad; ++j) row[j] = kNegInf<acc_t>;
        const acc_t lse_r = lse[r], delta_r = delta[r];
        if (a.dropout) {  // dP = (dO V^T) Z
          a.drop_row(z, dkey[r], j0, npad);
#pragma omp simd
          for (int64_t j = 0; j < npad; ++j) {
            row[j] = exp_or_zero(row[j] - lse_r) * (dprow[j] * z[j] - delta_r);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < npad; ++j) {
            row[j] = exp_or_zero(row[j] - lse_r) * (dprow[j] - delta_r);
          }
        }
      }
      if (dbias != nullptr) std::memcpy(dbias + r * a.Lk + j0, row, n * sizeof(acc_t));
    }
    gemm<acc_t, Isa>(rows, Dp, npad, s, BN, kr, Dp, dqa, Dp, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* dst = a.dq.at(b, h, i0 + r);
    const acc_t* src = dqa + r * Dp;
    for (int64_t d = 0; d < D; ++d) dst[d * a.dq.s3] = static_cast<scalar_t>(src[d] * a.scale);
  }
}

// Pass 2, one item per (batch, head, key block): dV = P^T dO and dK = scale dS^T Q, computed as
// [keys, queries] blocks (S^T = k (scale q)^T) so that the accumulators stay the item's own.
template <typename scalar_t, class Isa>
ROSITA_ALWAYS_INLINE void backward_dkv_item(const Args<scalar_t>& a, typename AccType<scalar_t>::type* buf,
                                  int64_t t) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int64_t BM = kBlockM, BN = kBlockN, P = kPad<acc_t>;
  const int64_t D = a.D, Dp = round_up(D, P), nkb = (a.Lk + BN - 1) / BN;
  acc_t* kr = buf;               // [BN, Dp] k
  acc_t* vr = kr + BN * Dp;      // [BN, Dp] v
  acc_t* dka = vr + BN * Dp;     // [BN, Dp] dK accumulator
  acc_t* dva = dka + BN * Dp;    // [BN, Dp] dV accumulator
  acc_t* qt = dva + BN * Dp;     // [D, BM]  (scale * q)^T
  acc_t* dot = qt + Dp * BM;     // [D, BM]  dO^T
  acc_t* qs = dot + Dp * BM;     // [BM, Dp] scale * q
  acc_t* dor = qs + BM * Dp;     // [BM, Dp] dO
  acc_t* st = dor + BM * Dp;     // [BN, BM] S^T, then dS^T
  acc_t* dpt = st + BN * BM;     // [BN, BM] dP^T
  acc_t* pt = dpt + BN * BM;     // [BN, BM] P^T
  acc_t* lse = pt + BN * BM;     // [BM] lse, +inf for padding rows and rows with no key left
  acc_t* delta = lse + BM;       // [BM]
  acc_t* row_buf = delta + BM;   // [Dp]
  bool keep[BN];
  acc_t z[BM];        // dropout factors of one key's column of the query block
  uint32_t dkey[BM];  // the query block's dropout row keys
  const int64_t b = t / (a.H * nkb), h = (t / nkb) % a.H, j0 = (t % nkb) * BN;
  const int64_t n = std::min(BN, a.Lk - j0);
  bool any = false;
  for (int64_t j = 0; j < n; ++j) any |= keep[j] = a.keep(b, j0 + j);
  zero(dka, n * Dp);
  zero(dva, n * Dp);
  if (any) {
    const Tile kv{n, n, D};
    load_rows(kr, Dp, a.k.at(b, h, j0), a.k.s2, a.k.s3, kv, acc_t(1));
    load_rows(vr, Dp, a.v.at(b, h, j0), a.v.s2, a.v.s3, kv, acc_t(1));
  }
  for (int64_t i0 = 0; any && i0 < a.Lq; i0 += BM) {
    const int64_t rows = std::min(BM, a.Lq - i0), mpad = round_up(rows, P);
    const Tile qtile{rows, mpad, D};
    load_transposed(qt, BM, row_buf, a.q.at(b, h, i0), a.q.s2, a.q.s3, qtile, a.scale);
    load_transposed(dot, BM, row_buf, a.grad.at(b, h, i0), a.grad.s2, a.grad.s3, qtile,
                    acc_t(1));
    load_rows(qs, Dp, a.q.at(b, h, i0), a.q.s2, a.q.s3, qtile, a.scale);
    load_rows(dor, Dp, a.grad.at(b, h, i0), a.grad.s2, a.grad.s3, qtile, acc_t(1));
    block_delta(a, b, h, i0, rows, dor, Dp, row_buf, delta);
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t x = *a.lse.at(b, h, i0 + i);
      // exp(s - (+inf)) = 0: a row with no key left contributes nothing.
      lse[i] = x == kNegInf<acc_t> ? -kNegInf<acc_t> : x;
    }
    for (int64_t i = rows; i < mpad; ++i) {
      lse[i] = -kNegInf<acc_t>;
      delta[i] = 0;
    }
    if (a.dropout) {
      // Padding rows get keys too (their p is 0: the factors only need to be finite).
      for (int64_t i = 0; i < mpad; ++i) dkey[i] = a.drop_key(b, h, i0 + i);
    }
    gemm<acc_t, Isa>(n, mpad, D, kr, Dp, qt, BM, st, BM, false);
    gemm<acc_t, Isa>(n, mpad, D, vr, Dp, dot, BM, dpt, BM, false);
    for (int64_t j = 0; j < n; ++j) {
      acc_t* srow = st + j * BM;
      acc_t* prow = pt + j * BM;
      const acc_t* dprow = dpt + j * BM;
      if (!keep[j]) {
        zero(srow, mpad);
        zero(prow, mpad);
        continue;
      }
      if (a.has_bias()) a.add_bias(srow, rows, b, h, i0, j0 + j, true);
      if (a.dropout) {  // dV takes P Z, dP = (dO V^T) Z
        a.drop_column(z, dkey, j0 + j, mpad);
#pragma omp simd
        for (int64_t i = 0; i < mpad; ++i) {
          const acc_t p = exp_or_zero(srow[i] - lse[i]);
          prow[i] = p * z[i];
          srow[i] = p * (dprow[i] * z[i] - delta[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < mpad; ++i) {
          const acc_t p = exp_or_zero(srow[i] - lse[i]);
          prow[i] = p;
          srow[i] = p * (dprow[i] - delta[i]);
        }
      }
    }
    gemm<acc_t, Isa>(n, Dp, mpad, pt, BM, dor, Dp, dva, Dp, true);
    gemm<acc_t, Isa>(n, Dp, mpad, st, BM, qs, Dp, dka, Dp, true);
  }
  for (int64_t j = 0; j < n; ++j) {
    scalar_t* dk = a.dk.at(b, h, j0 + j);
    scalar_t* dv = a.dv.at(b, h, j0 + j);
    for (int64_t d = 0; d < D; ++d) {
      dk[d * a.dk.s3] = static_cast<scalar_t>(dka[j * Dp + d]);
      dv[d * a.dv.s3] = static_cast<scalar_t>(dva[j * Dp + d]);
    }
  }
}

// Both passes as one range of items: dQ and dK/dV items alternate while both kinds last.
template <typename scalar_t, class Isa>
ROSITA_ALWAYS_INLINE void backward_items(const Args<scalar_t>& a, int64_t t0, int64_t t1) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t Dp = round_up(a.D, kPad<acc_t>);
  const int64_t q_items = a.B * a.H * ((a.Lq + kBlockM - 1) / kBlockM);
  const int64_t k_items = a.B * a.H * ((a.Lk + kBlockN - 1) / kBlockN);
  const int64_t paired = std::min(q_items, k_items);
  std::vector<acc_t> buf(std::max(dq_scratch(Dp), dkv_scratch(Dp)));
  for (int64_t t = t0; t < t1; ++t) {
    bool dq;
    int64_t item;
    if (t < 2 * paired) {
      dq = t % 2 == 0;
      item = t / 2;
    } else {
      dq = q_items > k_items;
      item = paired + (t - 2 * paired);
    }
    if (dq) {
      backward_dq_item<scalar_t, Isa>(a, buf.data(), item);
    } else {
      backward_dkv_item<scalar_t, Isa>(a, buf.data(), item);
    }
  }
}

// ---- ISA variants and dispatch ------------------------------------------------------------------

// (The kernels' template parameter `Isa` is a vector-type policy; this enum names the variants.)
using IsaLevel = rosita_fast::Isa;

// The best variant this CPU runs, capped by ROSITA_FAST_ATTENTION_ISA (read per call: a test hook).
IsaLevel call_isa() {
  const IsaLevel best = cpu_isa();
  const char* env = std::getenv("ROSITA_FAST_ATTENTION_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  IsaLevel cap = IsaLevel::Avx512;
  if (want == "baseline") {
    cap = IsaLevel::Base;
  } else if (want == "avx2") {
    cap = IsaLevel::Avx2;
  } else {
    TORCH_CHECK(want == "avx512",
                "ROSITA_FAST_ATTENTION_ISA must be baseline, avx2 or avx512, got '", want, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

template <typename scalar_t> using ItemsFn = void (*)(const Args<scalar_t>&, int64_t, int64_t);

#ifdef ROSITA_X86_DISPATCH
#define ATT_VARIANTS(NAME)                                                                     \
  template <typename scalar_t>                                                                 \
  void NAME##_baseline(const Args<scalar_t>& a, int64_t t0, int64_t t1) {                      \
    NAME<scalar_t, Baseline>(a, t0, t1);                                                       \
  }                                                                                            \
  template <typename scalar_t>                                                                 \
  ROSITA_AVX2 void NAME##_avx2(const Args<scalar_t>& a, int64_t t0, int64_t t1) {                 \
    NAME<scalar_t, Avx2>(a, t0, t1);                                                           \
  }                                                                                            \
  template <typename scalar_t>                                                                 \
  ROSITA_AVX512 void NAME##_avx512(const Args<scalar_t>& a, int64_t t0, int64_t t1) {             \
    NAME<scalar_t, Avx512>(a, t0, t1);                                                         \
  }                                                                                            \
  template <typename scalar_t> ItemsFn<scalar_t> NAME##_for(IsaLevel isa) {                    \
    switch (isa) {                                                                             \
      case IsaLevel::Avx512: return &NAME##_avx512<scalar_t>;                                 \
      case IsaLevel::Avx2: return &NAME##_avx2<scalar_t>;                                     \
      default: return &NAME##_baseline<scalar_t>;                                              \
    }                                                                                          \
  }
#else
#define ATT_VARIANTS(NAME)                                                                     \
  template <typename scalar_t>                                                                 \
  void NAME##_baseline(const Args<scalar_t>& a, int64_t t0, int64_t t1) {                      \
    NAME<scalar_t, Baseline>(a, t0, t1);                                                       \
  }                                                                                            \
  template <typename scalar_t> ItemsFn<scalar_t> NAME##_for(IsaLevel) {                        \
    return &NAME##_baseline<scalar_t>;                                                         \
  }
#endif

ATT_VARIANTS(forward_items)
ATT_VARIANTS(backward_items)

// ---- entry points -------------------------------------------------------------------------------

struct Shape {
  int64_t B, H, Lq, Lk, D;
};

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention (cpp): q, k and v must be 4-D [batch, heads, seq, head_dim]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention (cpp): q, k and v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention (cpp): q, k and v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention (cpp): k and v must have the same shape");
  const Shape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && k.size(1) == s.H && k.size(3) == s.D,
              "attention (cpp): q and k must agree in batch, heads and head_dim");
  TORCH_CHECK(s.D % 8 == 0 && s.D >= kMinHead && s.D <= kMaxHead,
              "attention (cpp): head_dim must be a multiple of 8 in [8, 128], got ", s.D);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == s.B &&
                    mask->size(1) == s.Lk,
                "attention (cpp): mask must be a bool [batch, seq_k] tensor");
    TORCH_CHECK(mask->device().is_cpu(), "attention (cpp): mask must be a CPU tensor");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == q.scalar_type() || bias->scalar_type() == at::kFloat,
                "attention (cpp): bias must have q's dtype or float32");
    TORCH_CHECK(bias->device().is_cpu(), "attention (cpp): bias must be a CPU tensor");
    const int64_t full[4] = {s.B, s.H, s.Lq, s.Lk};
    TORCH_CHECK(bias->dim() <= 4, "attention (cpp): bias must broadcast to [B, H, Lq, Lk]");
    for (int64_t i = 0; i < bias->dim(); ++i) {
      const int64_t n = bias->size(bias->dim() - 1 - i), f = full[3 - i];
      TORCH_CHECK(n == 1 || n == f, "attention (cpp): bias of shape ", bias->sizes(),
                  " does not broadcast to [B, H, Lq, Lk] = ", at::IntArrayRef(full, 4));
    }
  }
  return s;
}

template <typename T> View4<T> mutable_view4(const at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
Args<scalar_t> input_args(const Shape& sh, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                          const at::Tensor& bias_full, double scale) {
  using acc_t = typename AccType<scalar_t>::type;
  Args<scalar_t> a;
  a.B = sh.B, a.H = sh.H, a.Lq = sh.Lq, a.Lk = sh.Lk, a.D = sh.D;
  a.scale = static_cast<acc_t>(scale);
  a.q = view4<scalar_t>(q);
  a.k = view4<scalar_t>(k);
  a.v = view4<scalar_t>(v);
  if (mask.has_value()) {
    a.mask = mask->const_data_ptr<bool>();
    a.ms0 = mask->stride(0);
    a.ms1 = mask->stride(1);
  }
  if (bias_full.defined()) {
    if (bias_full.scalar_type() == q.scalar_type()) {
      a.bias = view4<scalar_t>(bias_full);
    } else {
      a.bias_f32 = view4<float>(bias_full);
    }
  }
  return a;
}

at::Tensor expanded_bias(const std::optional<at::Tensor>& bias, const Shape& s) {
  return bias.has_value() ? bias->expand({s.B, s.H, s.Lq, s.Lk}) : at::Tensor();
}

void check_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "attention (cpp): dropout_p must be in [0, 1), got ", dropout_p);
}

// The seed is taken modulo 2^32, as by rosita_fast/ops/_dropout.py.
template <typename scalar_t>
void set_dropout(Args<scalar_t>& a, double dropout_p, int64_t seed) {
  using acc_t = typename AccType<scalar_t>::type;
  if (dropout_p == 0.0) return;
  a.dropout = true;
  a.drop_seed = static_cast<uint32_t>(seed);
  a.drop_threshold = dropout::threshold(dropout_p);
  a.drop_scale = static_cast<acc_t>(dropout::scale(dropout_p));
}

// Shared by the inference and the training forward; the training one also returns lse.
std::tuple<at::Tensor, at::Tensor> forward_entry(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& bias,
                                                 double scale, bool want_lse, double dropout_p,
                                                 int64_t seed) {
  // Kernels compute; autograd is the op's business (rosita_fast/ops/attention.py).
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Shape sh = check_inputs(q, k, v, mask, bias);
  check_dropout(dropout_p);
  auto out = empty_output({sh.B, sh.Lq, sh.H, sh.D}, q.options()).transpose(1, 2);
  const auto acc_opts = q.options().dtype(acc_type(q.scalar_type()));
  auto lse = want_lse ? empty_output({sh.B, sh.H, sh.Lq}, acc_opts) : at::Tensor();
  const auto bias_full = expanded_bias(bias, sh);
  const int64_t items = sh.B * sh.H * ((sh.Lq + kBlockM - 1) / kBlockM);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    auto a = input_args<scalar_t>(sh, q, k, v, mask, bias_full, scale);
    set_dropout(a, dropout_p, seed);
    a.out = mutable_view4<scalar_t>(out);
    a.lse_out = want_lse ? lse.mutable_data_ptr<acc_t>() : nullptr;
    const auto fn = forward_items_for<scalar_t>(call_isa());
    at::parallel_for(0, items, 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  });
  return {out, lse};
}

at::Tensor attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& bias, double scale) {
  return std::get<0>(forward_entry(q, k, v, mask, bias, scale, false, 0.0, 0));
}

std::tuple<at::Tensor, at::Tensor> attention_train_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const std::optional<at::Tensor>& mask,
                                                       const std::optional<at::Tensor>& bias,
                                                       double scale, double dropout_p,
                                                       int64_t seed) {
  return forward_entry(q, k, v, mask, bias, scale, true, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, double scale, bool bias_needs_grad, double dropout_p,
    int64_t seed) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Shape sh = check_inputs(q, k, v, mask, bias);
  check_dropout(dropout_p);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "attention backward (cpp): grad and out must have q's shape");
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "attention backward (cpp): grad and out must have q's dtype");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H && lse.size(2) == sh.Lq,
              "attention backward (cpp): lse must be [batch, heads, seq_q]");
  const auto acc = acc_type(q.scalar_type());
  const auto lse_acc = lse.to(acc);
  const auto opts = q.options();
  auto dq = empty_output({sh.B, sh.Lq, sh.H, sh.D}, opts).transpose(1, 2);
  auto dk = empty_output({sh.B, sh.Lk, sh.H, sh.D}, opts).transpose(1, 2);
  auto dv = empty_output({sh.B, sh.Lk, sh.H, sh.D}, opts).transpose(1, 2);
  const bool want_dbias = bias.has_value() && bias_needs_grad;
  auto dbias = want_dbias ? empty_output({sh.B, sh.H, sh.Lq, sh.Lk}, opts.dtype(acc))
                          : at::empty({0}, opts);
  const auto bias_full = expanded_bias(bias, sh);
  const int64_t items =
      sh.B * sh.H * ((sh.Lq + kBlockM - 1) / kBlockM + (sh.Lk + kBlockN - 1) / kBlockN);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    auto a = input_args<scalar_t>(sh, q, k, v, mask, bias_full, scale);
    set_dropout(a, dropout_p, seed);
    a.grad = view4<scalar_t>(grad);
    a.o = view4<scalar_t>(out);
    a.lse = {lse_acc.const_data_ptr<acc_t>(), lse_acc.stride(0), lse_acc.stride(1),
             lse_acc.stride(2), 0};
    a.dq = mutable_view4<scalar_t>(dq);
    a.dk = mutable_view4<scalar_t>(dk);
    a.dv = mutable_view4<scalar_t>(dv);
    a.dbias = want_dbias ? dbias.mutable_data_ptr<acc_t>() : nullptr;
    const auto fn = backward_items_for<scalar_t>(call_isa());
    at::parallel_for(0, items, 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def(
      "attention_cpp(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? bias, float scale) -> "
      "Tensor");
  m.def(
      "attention_train_cpp(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? bias, float scale, "
      "float dropout_p=0.0, int seed=0) -> (Tensor, Tensor)");
  m.def(
      "attention_backward_cpp(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, Tensor? bias, float scale, bool bias_needs_grad, float dropout_p=0.0, "
      "int seed=0) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("attention_cpp", &attention_fwd);
  m.impl("attention_train_cpp", &attention_train_fwd);
  m.impl("attention_backward_cpp", &attention_bwd);
}

}  // namespace rosita_fast
