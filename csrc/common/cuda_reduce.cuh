// Warp reductions (torch-free). Max is exact in any order, so these are deterministic.
#pragma once

#include "common/cuda_mma.cuh"

namespace qbert::cuda {

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

}  // namespace qbert::cuda
