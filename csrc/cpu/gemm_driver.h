// The int8 GEMM with a fused epilogue, shared by int8_gemm_cpu and int8_linear_cpu:
// for a int8 [M, K] and b int8 [N, K] (row-major, contiguous), computes acc = a @ b.T exactly and
// hands each finished int32 tile to `epi` (gemm_epilogue.h), on the kernels of `isa`.
#pragma once

#include <cstdint>

#include "common/constants.h"
#include "cpu/gemm_epilogue.h"
#include "cpu/isa.h"

namespace qbert::cpu {

// Exact for K <= kInt8GemmMaxK (common/constants.h); the callers check it. `b_packed`: b as
// amx_pack_weight left it, or null; used by the AMX kernels only (b itself serves the others).
void int8_gemm_fused(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi, Isa isa,
                     const uint8_t* b_packed = nullptr);

// Whether the kernels of `isa` take b [N, K] packed (amx_pack_weight), and the bytes it packs into.
bool amx_packs(Isa isa, int64_t N, int64_t K);
int64_t amx_packed_bytes(int64_t N, int64_t K);
// Packs b [N, K] (amx_packs true) into dst [amx_packed_bytes] for the AMX kernel (gemm_amx.h).
void amx_pack_weight(const int8_t* b, int64_t N, int64_t K, uint8_t* dst);

}  // namespace qbert::cpu
