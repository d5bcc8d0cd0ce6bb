// The x86 instruction-set variants of the C++ CPU kernels' row loops, and which one this CPU runs.
//
// A hot loop is written once (an always-inline template) and instantiated in functions marked
// ROSITA_AVX2 / ROSITA_AVX512, so GCC vectorizes each copy for that ISA; a dispatcher picks the copy
// per call from cpu_isa(). The features are tested with __builtin_cpu_supports: GCC's
// target_clones "arch=" variants test the CPU model, not its features, and miss AMD parts. AVX-512
// halves the GELU and LayerNorm passes' time next to AVX2 on the development machines.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define ROSITA_X86_DISPATCH 1
#define ROSITA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ROSITA_AVX512                                                                          \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,"                    \
                        "prefer-vector-width=512")))
#endif
#define ROSITA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace rosita_fast {

enum class Isa : int { Base = 0, Avx2 = 1, Avx512 = 2 };

// The best variant this CPU runs (probed once per process).
inline Isa cpu_isa() {
#ifdef ROSITA_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::Avx512 : avx2 ? Isa::Avx2 : Isa::Base;
  }();
  return isa;
#else
  return Isa::Base;
#endif
}

}  // namespace rosita_fast
