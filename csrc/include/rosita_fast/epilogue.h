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
// always_inline: the loops that call these only vectorize once the calls are gone.
#define ROSITA_HD inline __attribute__((always_inline))
#endif

namespace rosita_fast {

// Keep in sync with rosita_fast/activations.py (ACTIVATIONS) and kernels/lowrank_linear.py.
enum class Activation : int64_t { None = 0, ReLU = 1, Gelu = 2, GeluTanh = 3 };

// ---- float transcendental functions ------------------------------------------------------------
// On the GPU these are the CUDA math library's. On the CPU, libm's erff/expf/tanhf are scalar calls
// that block vectorization and would dominate a fused GELU epilogue, so the host versions are
// branch-free polynomial forms built only from +, *, / and bit operations, which the compiler
// vectorizes: exp by Cody-Waite range reduction and a degree-6 polynomial (~1 ulp), erf by the
// Abramowitz-Stegun 7.1.26 rational form (|error| < 1.5e-7, the accuracy class of ATen's own
// vectorized GELU). NaN inputs reach the activations' outputs through the factor z itself.

ROSITA_HD float fast_expf(float x) {
  // Clamp to the range where 2^n stays a normal float; NaN is absorbed here and carried by z.
  // (Comparisons, not fminf/fmaxf: those carry NaN rules that stop vectorization.)
  x = x > -87.0f ? x : -87.0f;
  x = x < 88.0f ? x : 88.0f;
  // Round-to-nearest of x*log2(e) with the 1.5*2^23 trick: after the add, the low mantissa bits of
  // t hold n as an integer, so no float->int conversion (which would block vectorization) is needed.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  // Cody-Waite: ln2 = 0.693359375 - 2.12194440e-4, so x - n*ln2 is exact to ~1 ulp.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
#if defined(__CUDA_ARCH__)
  const int32_t n_int = __float_as_int(t) - 0x4B400000;
#else
  const int32_t n_int = __builtin_bit_cast(int32_t, t) - 0x4B400000;
#endif
  const int32_t bits = (n_int + 127) << 23;
#if defined(__CUDA_ARCH__)
  return p * __int_as_float(bits);
#else
  return p * __builtin_bit_cast(float, bits);
#endif
}

ROSITA_HD float fast_erff(float x) {
  const float ax = fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float y = 1.0f - poly * t * fast_expf(-ax * ax);
  return copysignf(y, x);
}

ROSITA_HD float fast_tanhf(float x) {
  return 1.0f - 2.0f / (fast_expf(2.0f * x) + 1.0f);
}

#if defined(__CUDA_ARCH__)
ROSITA_HD float r_erf(float x) { return erff(x); }
ROSITA_HD float r_tanh(float x) { return tanhf(x); }
ROSITA_HD float r_exp(float x) { return expf(x); }
#else
ROSITA_HD float r_erf(float x) { return fast_erff(x); }
ROSITA_HD float r_tanh(float x) { return fast_tanhf(x); }
ROSITA_HD float r_exp(float x) { return fast_expf(x); }
#endif
// fp64 (gradient checks, reference-grade runs) keeps libm's exact functions everywhere.
ROSITA_HD double r_erf(double x) { return erf(x); }
ROSITA_HD double r_tanh(double x) { return tanh(x); }
ROSITA_HD double r_exp(double x) { return exp(x); }

// 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi) and the tanh-approximation coefficient of GELU.
template <typename T> struct GeluConst {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  static constexpr T kCubic = T(0.044715);
};

// act(z) with the activation fixed at compile time, so loops over a block vectorize.
// NaN propagates through every branch (relu's comparison is false for NaN, so it returns z).
template <Activation A, typename T> ROSITA_HD T act_forward_t(T z) {
  switch (A) {
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

// d act(z) / dz, activation fixed at compile time.
template <Activation A, typename T> ROSITA_HD T act_grad_t(T z) {
  switch (A) {
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

// Runtime-dispatched forms (one switch per element; used where the activation varies per call).
template <typename T> ROSITA_HD T act_forward(T z, Activation a) {
  switch (a) {
    case Activation::ReLU: return act_forward_t<Activation::ReLU>(z);
    case Activation::Gelu: return act_forward_t<Activation::Gelu>(z);
    case Activation::GeluTanh: return act_forward_t<Activation::GeluTanh>(z);
    default: return z;
  }
}

template <typename T> ROSITA_HD T act_grad(T z, Activation a) {
  switch (a) {
    case Activation::ReLU: return act_grad_t<Activation::ReLU>(z);
    case Activation::Gelu: return act_grad_t<Activation::Gelu>(z);
    case Activation::GeluTanh: return act_grad_t<Activation::GeluTanh>(z);
    default: return T(1);
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
