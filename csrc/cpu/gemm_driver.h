// The int8 GEMM with a fused epilogue, shared by int8_gemm_cpu and int8_linear_cpu:
// for a int8 [M, K] and b int8 [N, K] (row-major, contiguous), computes acc = a @ b.T exactly and
// hands each finished int32 tile to `epi` (gemm_epilogue.h), on the kernels of `isa`.
#pragma once

#include <cstdint>

#include "common/constants.h"
#include "cpu/gemm_epilogue.h"
#include "cpu/isa.h"

namespace qbert::cpu {

// Exact for K <= kInt8GemmMaxK (common/constants.h); the callers check it.
void int8_gemm_fused(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi, Isa isa);

}  // namespace qbert::cpu
