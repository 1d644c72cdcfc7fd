// The per-token int8 rule shared by quantize_per_token_cpu and add_layernorm_quantize_cpu (spec:
// qbert/ops/quantize_per_token.py): a row of finite values gets scale = amax / 127, or 1 where that is 0
// (an all-zero row, or one whose amax / 127 underflows); a row holding a NaN or an infinity gets scale
// NaN and codes 0.
//
// A row's amax is found as the max of the bit patterns of |v| (the sign bit cleared) as integers: for
// non-negative floats they order as the values do, and +inf and every NaN lie above every finite value.
// A float max would not do: max instructions drop a NaN operand (or keep it only in one operand order),
// so a NaN could vanish from the row's max.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "common/constants.h"

namespace qbert::cpu::token {

constexpr float kQmax = kInt8Qmax;          // the clamp and the scale divisor, as a float
constexpr uint32_t kAbsMask = 0x7fffffffu;  // clears a float's sign bit
constexpr uint32_t kInfBits = 0x7f800000u;  // +inf; NaNs lie above it, finite |v| below

inline uint32_t abs_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & kAbsMask;
}

inline float from_bits(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Whether a row whose max |v| bit pattern is `amax_bits` is all finite.
inline bool finite_row(uint32_t amax_bits) { return amax_bits < kInfBits; }

// The scale of a finite row with max |v| = amax (a true division, as the reference's).
inline float scale_of(float amax) {
  const float s = amax / kQmax;
  return s > 0.0f ? s : 1.0f;
}

// The scale of a row with a NaN or an infinity; its codes are 0.
inline float nonfinite_scale() { return std::numeric_limits<float>::quiet_NaN(); }

}  // namespace qbert::cpu::token
