// CUDA kernels for the low-rank linear layer: y = act(x @ v^T @ u^T + bias).
//
// The two products go through the GPU BLAS that torch links (at::mm -> cuBLAS, fp32 accumulation
// for fp16/bf16); one elementwise kernel then applies bias and activation in place. The backward
// uses the same split: a kernel forms dz = grad * act'(z + bias), and the products are cuBLAS calls.
//
// This file is compiled for sm_80 and sm_90 by the test suite (ptxas report checked for spills) but
// cannot run on the development machines, which have no GPU: its per-element math comes from
// rosita_fast/epilogue.h, which the C++ CPU kernel shares and the CPU tests exercise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rosita_fast/epilogue.h"

namespace rosita_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void bias_act_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ bias,
                                int64_t numel, int64_t n_cols, Activation act) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[i % n_cols]) : acc_t(0);
    out[i] = static_cast<scalar_t>(bias_act<acc_t>(static_cast<acc_t>(out[i]), b, act));
  }
}

// z holds x v^T u^T (no bias); it is overwritten with dz = grad * act'(z + bias).
template <typename scalar_t>
__global__ void act_grad_kernel(scalar_t* __restrict__ z, const scalar_t* __restrict__ grad,
                                const scalar_t* __restrict__ bias, int64_t numel, int64_t n_cols,
                                Activation act) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[i % n_cols]) : acc_t(0);
    const acc_t zz = static_cast<acc_t>(z[i]) + b;
    z[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * act_grad<acc_t>(zz, act));
  }
}

int grid_for(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && u.is_cuda() && v.is_cuda(),
              "rosita_fast lowrank_linear (cuda): x, u and v must be CUDA tensors");
  TORCH_CHECK(x.device() == u.device() && x.device() == v.device(),
              "lowrank_linear: x, u and v must be on the same device");
  TORCH_CHECK(x.size(-1) == v.size(1) && u.size(1) == v.size(0), "lowrank_linear: shape mismatch");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->size(0) == u.size(0),
                "lowrank_linear: bias must be [out_features] on x's device");
  }
}

// With h_out, also returns h = x v^T (fp32 for fp16/bf16 inputs) for the backward.
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                        const std::optional<at::Tensor>& bias, int64_t activation,
                        at::Tensor* h_out) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_cuda_inputs(x, u, v, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = u.size(0);
  const auto x2d = x.reshape({-1, x.size(-1)});
  const auto h = at::mm(x2d, v.t());
  if (h_out != nullptr) *h_out = x.scalar_type() == at::kDouble ? h : h.to(at::kFloat);
  auto out = at::mm(h, u.t());
  const int64_t numel = out.numel();
  if (numel == 0) return out.view(out_shape);
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bias_act_cuda", [&] {
    bias_act_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(),
        bias.has_value() ? bias_c.const_data_ptr<scalar_t>() : nullptr, numel, out.size(1),
        static_cast<Activation>(activation));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(out_shape);
}

at::Tensor lowrank_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                   const std::optional<at::Tensor>& bias, int64_t activation) {
  return forward_cuda(x, u, v, bias, activation, nullptr);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_train_cuda(
    const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t activation) {
  at::Tensor h;
  auto out = forward_cuda(x, u, v, bias, activation, &h);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t activation,
    const std::optional<at::Tensor>& h_saved) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_cuda_inputs(x, u, v, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto act = static_cast<Activation>(activation);
  const auto x2d = x.reshape({-1, x.size(-1)});
  const auto g2d = grad.reshape({-1, u.size(0)}).contiguous();
  const auto h = h_saved.has_value() && h_saved->defined() ? h_saved->to(x.scalar_type())
                                                          : at::mm(x2d, v.t());
  at::Tensor dz = g2d;
  if (act != Activation::None && g2d.numel() > 0) {
    dz = at::mm(h, u.t());
    const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const int64_t numel = dz.numel();
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "act_grad_cuda", [&] {
      act_grad_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
          dz.mutable_data_ptr<scalar_t>(), g2d.const_data_ptr<scalar_t>(),
          bias.has_value() ? bias_c.const_data_ptr<scalar_t>() : nullptr, numel, dz.size(1), act);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto g = at::mm(dz, u);
  auto dx = at::mm(g, v).view(x.sizes());
  auto du = at::mm(dz.t(), h);
  auto dv = at::mm(g.t(), x2d);
  auto dbias = bias.has_value() ? dz.sum(0, false, at::kFloat).to(bias->scalar_type()) : at::Tensor();
  return {dx, du, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rosita_fast, m) {
  m.def("lowrank_linear_cuda(Tensor x, Tensor u, Tensor v, Tensor? bias, int activation) -> Tensor");
  m.def(
      "lowrank_linear_train_cuda(Tensor x, Tensor u, Tensor v, Tensor? bias, int activation) -> "
      "(Tensor, Tensor)");
  m.def(
      "lowrank_linear_backward_cuda(Tensor grad, Tensor x, Tensor u, Tensor v, Tensor? bias, "
      "int activation, Tensor? h=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rosita_fast, CUDA, m) {
  m.impl("lowrank_linear_cuda", &lowrank_linear_fwd_cuda);
  m.impl("lowrank_linear_train_cuda", &lowrank_linear_train_cuda);
  m.impl("lowrank_linear_backward_cuda", &lowrank_linear_bwd_cuda);
}

}  // namespace rosita_fast
