// Counter-based dropout shared by the fused ops: an element's keep decision is a hash of
// (seed, row, col), so no mask is stored and the backward regenerates it. Bit for bit the hash of
// rosita_fast/ops/_dropout.py (the ground truth; its docstring defines it) and of
// kernels/_common.py's dropout_keep.
#pragma once

#include <cmath>
#include <cstdint>

namespace rosita_fast {
namespace dropout {

inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

// The per-row half of the hash (computed once per row).
inline uint32_t row_key(uint32_t seed, int64_t row) {
  return mix(static_cast<uint32_t>(row) * 0x61C88647u + seed);
}

inline bool keep(uint32_t key, int64_t col, uint32_t threshold) {
  return (mix(key ^ (static_cast<uint32_t>(col) * 0x27D4EB2Fu)) >> 8) >= threshold;
}

// round(p * 2^24) and the kept elements' scale 2^24 / (2^24 - threshold).
inline uint32_t threshold(double p) {
  return static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
}
inline double scale(double p) { return 16777216.0 / (16777216.0 - threshold(p)); }

}  // namespace dropout
}  // namespace rosita_fast
