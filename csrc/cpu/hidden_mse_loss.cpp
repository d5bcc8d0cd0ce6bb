// C++ CPU kernels of hidden_mse_loss (rosita_fast/ops/hidden_mse_loss.py): for pairs of student
// and teacher states s_i, t_i ([B, T, H], rows r = B * T), term_i = sum_{r kept} sum_h
// (s_i - t_i)^2 / (kept rows * H), and its gradient 2 (s_i - t_i) g_i / (kept rows * H).
//
// All pairs in one parallel region: the work items are (pair, block of kRows rows), so a few
// layers of a small batch still use every thread. A row's squares are summed in fp32 (fp64 for
// fp64) over kLanes accumulators, a block's rows in double, and a pair's blocks in block order:
// the result does not depend on the thread count. Rows are read in place through their stride
// (unit stride along H; other layouts are copied first); dropped rows are not read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rosita_fast/cpu_isa.h"
#include "rosita_fast/onednn_linear.h"
#include "rosita_fast/poison.h"

namespace rosita_fast {
namespace {

constexpr int64_t kRows = 32;  // rows per work item (fixed: results independent of threads)
constexpr int kLanes = 16;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

struct Pair {
  const void* s;
  const void* t;
  void* g;  // backward output (contiguous), or null
  int64_t ld_s, ld_t;
};

struct Args {
  std::vector<Pair> pairs;
  int64_t rows, H;
  const bool* mask;  // [rows] or null
  std::vector<double> coef;  // backward: 2 g_i / count
  double* partial;           // forward: [pairs, blocks]
  int64_t blocks;
};

template <typename T, typename A>
ROSITA_ALWAYS_INLINE A row_sq(const T* s, const T* t, int64_t H) {
  A acc[kLanes] = {};
  int64_t h = 0;
  for (; h + kLanes <= H; h += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A d = load_acc<A>(s[h + l]) - load_acc<A>(t[h + l]);
      acc[l] += d * d;
    }
  }
  for (; h < H; ++h) {
    const A d = load_acc<A>(s[h]) - load_acc<A>(t[h]);
    acc[0] += d * d;
  }
  A total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

template <typename T, typename A>
ROSITA_ALWAYS_INLINE void row_grad(const T* s, const T* t, T* g, int64_t H, A coef) {
  for (int64_t h = 0; h < H; ++h) {
    g[h] = store_as<T>((load_acc<A>(s[h]) - load_acc<A>(t[h])) * coef);
  }
}

// Work items [begin, end) of the forward (Grad = false) or the backward.
template <typename T, bool Grad>
ROSITA_ALWAYS_INLINE void items_impl(const Args& a, int64_t begin, int64_t end) {
  using A = typename AccOf<T>::type;
  const int64_t H = a.H;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / a.blocks, blk = item % a.blocks;
    const Pair& pr = a.pairs[p];
    const int64_t r0 = blk * kRows, r1 = std::min(a.rows, r0 + kRows);
    const T* s = static_cast<const T*>(pr.s);
    const T* t = static_cast<const T*>(pr.t);
    if (Grad) {
      T* g = static_cast<T*>(pr.g);
      const A coef = static_cast<A>(a.coef[p]);
      for (int64_t r = r0; r < r1; ++r) {
        if (a.mask != nullptr && !a.mask[r]) {
          std::fill(g + r * H, g + (r + 1) * H, store_as<T>(A(0)));
        } else {
          row_grad<T, A>(s + r * pr.ld_s, t + r * pr.ld_t, g + r * H, H, coef);
        }
      }
    } else {
      double sum = 0;
      for (int64_t r = r0; r < r1; ++r) {
        if (a.mask != nullptr && !a.mask[r]) continue;
        sum += static_cast<double>(row_sq<T, A>(s + r * pr.ld_s, t + r * pr.ld_t, H));
      }
      a.partial[item] = sum;
    }
  }
}

template <typename T, bool Grad> void items_base(const Args& a, int64_t b, int64_t e) {
  items_impl<T, Grad>(a, b, e);
}
#ifdef ROSITA_X86_DISPATCH
template <typename T, bool Grad> ROSITA_AVX2 void items_avx2(const Args& a, int64_t b, int64_t e) {
  items_impl<T, Grad>(a, b, e);
}
template <typename T, bool Grad>
ROSITA_AVX512 void items_avx512(const Args& a, int64_t b, int64_t e) {
  items_impl<T, Grad>(a, b, e);
}
#endif

template <typename T, bool Grad> void items(const Args& a, int64_t b, int64_t e) {
#ifdef ROSITA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512: return items_avx512<T, Grad>(a, b, e);
    case Isa::Avx2: return items_avx2<T, Grad>(a, b, e);
    default: break;
  }
#endif
  items_base<T, Grad>(a, b, e);
}

// ---- entry points ------------------------------------------------------------------------------

at::Tensor rows_2d(const at::Tensor& x, int64_t H) {
  auto x2 = x.detach().reshape({-1, H});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

// Validates the lists and fills everything of Args but the outputs; keeps the row views alive.
Args prepare(at::TensorList student, at::TensorList teacher, const std::optional<at::Tensor>& mask,
             std::vector<at::Tensor>& keep, at::Tensor& mask_flat) {
  TORCH_CHECK(!student.empty(), "hidden_mse_loss_cpp: no states");
  TORCH_CHECK(student.size() == teacher.size(),
              "hidden_mse_loss_cpp: the student and teacher lists must pair up");
  const auto& ref = student[0];
  TORCH_CHECK(ref.dim() == 3, "hidden_mse_loss_cpp: states must be [batch, seq, hidden]");
  Args a;
  a.H = ref.size(2);
  a.rows = ref.size(0) * ref.size(1);
  for (size_t i = 0; i < student.size(); ++i) {
    for (const auto* x : {&student[i], &teacher[i]}) {
      TORCH_CHECK(x->device().is_cpu(), "hidden_mse_loss_cpp: CPU tensors only");
      TORCH_CHECK(x->sizes() == ref.sizes() && x->scalar_type() == ref.scalar_type(),
                  "hidden_mse_loss_cpp: every state must have the first one's shape and dtype");
    }
    keep.push_back(rows_2d(student[i], a.H));
    keep.push_back(rows_2d(teacher[i], a.H));
    const auto& s = keep[keep.size() - 2];
    const auto& t = keep.back();
    a.pairs.push_back({s.const_data_ptr(), t.const_data_ptr(), nullptr, s.stride(0), t.stride(0)});
  }
  a.mask = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == a.rows,
                "hidden_mse_loss_cpp: mask must be a bool [batch, seq] tensor");
    mask_flat = mask->reshape({a.rows}).contiguous();
    a.mask = mask_flat.const_data_ptr<bool>();
  }
  a.blocks = std::max<int64_t>(1, (a.rows + kRows - 1) / kRows);
  a.partial = nullptr;
  return a;
}

double kept_count(const Args& a) {
  int64_t kept = a.rows;
  if (a.mask != nullptr) kept = std::count(a.mask, a.mask + a.rows, true);
  return static_cast<double>(std::max<int64_t>(kept, 1) * a.H);
}

int64_t grain(const Args& a) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRows * a.H)); }

at::Tensor forward(at::TensorList student, at::TensorList teacher,
                   const std::optional<at::Tensor>& mask) {
  std::vector<at::Tensor> keep;
  at::Tensor mask_flat;
  Args a = prepare(student, teacher, mask, keep, mask_flat);
  const auto dt = student[0].scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t P = static_cast<int64_t>(a.pairs.size());
  std::vector<double> partial(P * a.blocks, 0.0);
  a.partial = partial.data();
  if (a.rows > 0 && a.H > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "hidden_mse_loss_cpp", [&] {
      at::parallel_for(0, P * a.blocks, grain(a),
                       [&](int64_t b, int64_t e) { items<scalar_t, false>(a, b, e); });
    });
  }
  const double count = kept_count(a);
  auto out = at::empty({P}, at::TensorOptions().dtype(at::kDouble));
  auto* o = out.data_ptr<double>();
  for (int64_t p = 0; p < P; ++p) {
    double sum = 0;
    for (int64_t k = 0; k < a.blocks; ++k) sum += partial[p * a.blocks + k];
    o[p] = sum / count;
  }
  return out.to(acc);
}

std::vector<at::Tensor> backward(const at::Tensor& grad, at::TensorList student,
                                 at::TensorList teacher, const std::optional<at::Tensor>& mask) {
  std::vector<at::Tensor> keep;
  at::Tensor mask_flat;
  Args a = prepare(student, teacher, mask, keep, mask_flat);
  const int64_t P = static_cast<int64_t>(a.pairs.size());
  TORCH_CHECK(grad.numel() == P, "hidden_mse_loss_backward_cpp: one gradient per pair");
  const auto g64 = grad.detach().to(at::kDouble).contiguous();
  const double count = kept_count(a);
  std::vector<at::Tensor> outs;
  for (int64_t p = 0; p < P; ++p) {
    a.coef.push_back(2.0 * g64.const_data_ptr<double>()[p] / count);
    outs.push_back(empty_output(student[p].sizes(), student[p].options()));
    a.pairs[p].g = outs.back().data_ptr();
  }
  if (a.rows > 0 && a.H > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student[0].scalar_type(),
                                    "hidden_mse_loss_backward_cpp", [&] {
      at::parallel_for(0, P * a.blocks, grain(a),
                       [&](int64_t b, int64_t e) { items<scalar_t, true>(a, b, e); });
    });
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("hidden_mse_loss_cpp(Tensor[] student, Tensor[] teacher, Tensor? mask=None) -> Tensor");
  m.def(
      "hidden_mse_loss_backward_cpp(Tensor grad, Tensor[] student, Tensor[] teacher, "
      "Tensor? mask=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rosita_fast, CPU, m) {
  m.impl("hidden_mse_loss_cpp", &forward);
  m.impl("hidden_mse_loss_backward_cpp", &backward);
}

}  // namespace rosita_fast
