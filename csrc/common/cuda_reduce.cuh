// Warp and block reductions (torch-free). Max is exact in any order, so these are deterministic.
#pragma once

#include "common/cuda_mma.cuh"

namespace qbert::cuda {

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The max of `v` over the block's kThreads threads, returned to every thread. Contains barriers: every
// thread of the block must call it.
template <int kThreads>
__device__ __forceinline__ float block_max(float v) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "whole warps, at most 32");
  __shared__ float partial[kThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kThreads / kWarpSize ? partial[lane] : partial[0];
  return warp_max(v);
}

}  // namespace qbert::cuda
