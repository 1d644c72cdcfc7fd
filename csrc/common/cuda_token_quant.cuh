// quantize_per_token's rule on CUDA (spec: qbert/ops/quantize_per_token.py), shared by every kernel that
// quantizes a row: row_quantize (quantize_per_token, add_layernorm_quantize), the W4A8 activation quantizer
// and the int8 GEMM's requantizing epilogue. Torch-free.
//   a row of finite values: scale = amax / 127 (IEEE division), 1 where that is 0 (an all-zero row, or an
//     underflow); code = clamp(rint(v / scale), -127, 127) (rint rounds half to even);
//   a row holding a NaN or an infinity: scale NaN, codes 0.
// A row's amax is the max of finite_abs over it, +inf exactly when the row is not all finite: fmaxf (and
// PTX max.f32) return the other operand of a NaN, so a NaN must not reach a max as a NaN.
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "common/constants.h"

namespace qbert::cuda::token {

constexpr float kQmax = kInt8Qmax;  // the clamp and the scale divisor, as a float

// |v| where v is finite, +inf where it is a NaN or an infinity (NaN < inf is false).
__device__ __forceinline__ float finite_abs(float v) {
  const float a = fabsf(v);
  return a < CUDART_INF_F ? a : CUDART_INF_F;
}

__device__ __forceinline__ bool finite_row(float amax) { return amax < CUDART_INF_F; }

// The scale of a row whose max of finite_abs is amax.
__device__ __forceinline__ float scale_of(float amax) {
  if (!finite_row(amax)) return CUDART_NAN_F;
  const float s = __fdiv_rn(amax, kQmax);
  return s > 0.f ? s : 1.f;
}

// The int8 code of v at the row's scale; 0 when the scale is NaN (a non-finite row). The clamped value is
// integral, so the int8 conversion is exact.
__device__ __forceinline__ int8_t code_of(float v, float scale) {
  const float c = fminf(fmaxf(rintf(__fdiv_rn(v, scale)), -kQmax), kQmax);
  return isnan(scale) ? int8_t{0} : static_cast<int8_t>(c);
}

}  // namespace qbert::cuda::token
