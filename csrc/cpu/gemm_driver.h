// The int8 GEMM with a fused epilogue, shared by int8_gemm_cpu and int8_linear_cpu:
// for a int8 [M, K] and b int8 [N, K] (row-major, contiguous), computes acc = a @ b.T exactly and
// hands each finished int32 tile to `epi` (gemm_epilogue.h), on the kernels of `isa`.
#pragma once

#include <cstdint>
#include <limits>

#include "cpu/gemm_epilogue.h"
#include "cpu/isa.h"

namespace qbert::cpu {

// The largest K for which an int8 x int8 dot product is exact in int32 whatever the codes (-128 included):
// K * 128 * 128 <= 2^31 - 1 (qbert/quant/int8.py's INT8_GEMM_MAX_K). Past it the accumulators wrap.
constexpr int64_t kInt8AbsMax = 128;
constexpr int64_t kInt8GemmMaxK = std::numeric_limits<int32_t>::max() / (kInt8AbsMax * kInt8AbsMax);

void int8_gemm_fused(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi, Isa isa);

}  // namespace qbert::cpu
