// Per-element math shared by the C++ CPU kernels and the CUDA kernels.
//
// The CUDA sources cannot run on the development machines (no GPU), so everything numerical that
// they do element by element lives here, where the CPU kernels (which the test suite runs) exercise
// exactly the same code.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ROSITA_HD __host__ __device__ __forceinline__
#else
#define ROSITA_HD inline
#endif

namespace rosita_fast {

// Keep in sync with rosita_fast/activations.py (ACTIVATIONS) and kernels/lowrank_linear.py.
enum class Activation : int64_t { None = 0, ReLU = 1, Gelu = 2, GeluTanh = 3 };

ROSITA_HD float r_erf(float x) { return erff(x); }
ROSITA_HD double r_erf(double x) { return erf(x); }
ROSITA_HD float r_tanh(float x) { return tanhf(x); }
ROSITA_HD double r_tanh(double x) { return tanh(x); }
ROSITA_HD float r_exp(float x) { return expf(x); }
ROSITA_HD double r_exp(double x) { return exp(x); }

// 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi) and the tanh-approximation coefficient of GELU.
template <typename T> struct GeluConst {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  static constexpr T kCubic = T(0.044715);
};

// act(z). NaN propagates through every branch (relu's comparison is false for NaN, so it returns z).
template <typename T> ROSITA_HD T act_forward(T z, Activation a) {
  switch (a) {
    case Activation::ReLU:
      return z < T(0) ? T(0) : z;
    case Activation::Gelu:
      return T(0.5) * z * (T(1) + r_erf(z * GeluConst<T>::kInvSqrt2));
    case Activation::GeluTanh: {
      const T inner = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCubic * z * z * z);
      return T(0.5) * z * (T(1) + r_tanh(inner));
    }
    default:
      return z;
  }
}

// d act(z) / dz.
template <typename T> ROSITA_HD T act_grad(T z, Activation a) {
  switch (a) {
    case Activation::ReLU:
      // Same convention as torch.relu's backward: the gradient at 0 (and at NaN) is 0.
      return z > T(0) ? T(1) : T(0);
    case Activation::Gelu: {
      const T cdf = T(0.5) * (T(1) + r_erf(z * GeluConst<T>::kInvSqrt2));
      const T pdf = GeluConst<T>::kInvSqrt2Pi * r_exp(T(-0.5) * z * z);
      return cdf + z * pdf;
    }
    case Activation::GeluTanh: {
      const T inner = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCubic * z * z * z);
      const T t = r_tanh(inner);
      const T dinner = GeluConst<T>::kSqrt2OverPi * (T(1) + T(3) * GeluConst<T>::kCubic * z * z);
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * dinner;
    }
    default:
      return T(1);
  }
}

// Accumulation type: fp16 and bf16 accumulate in fp32, fp64 stays fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// The fused epilogue for one element of a low-rank (or any) linear layer: bias, then activation.
template <typename Acc> ROSITA_HD Acc bias_act(Acc acc, Acc bias, Activation a) {
  return act_forward<Acc>(acc + bias, a);
}

}  // namespace rosita_fast
