// Packed copies of int8 weights for the kernels that take them packed (the AMX GEMM, gemm_amx.h), made on a
// weight's first use and kept while it lives, so a call streams ready tiles instead of packing or
// transposing anything.
#pragma once

#include <ATen/ATen.h>

namespace qbert::cpu {

// w [N, K] int8, contiguous, CPU, amx_packs(isa, N, K). Returns its packed copy (uint8 [amx_packed_bytes]),
// from the cache or made now; an undefined tensor for an inference tensor (it has no version counter, so
// an in-place change could not be told; the caller then runs the unpacked kernel).
//
// A copy is keyed by the weight's storage (a weak reference: the entry goes when the storage is freed),
// offset and shape, and is valid for the version it was made at: an in-place change (copy_, load_state_dict,
// any op that bumps the tensor's version) makes the next call pack anew. Writes that bypass the version
// counter (through .data, .numpy() or the raw storage) are not seen: after such a write call
// clear_weight_cache(). Memory: one more int8 copy of each weight used this way.
at::Tensor packed_weight(const at::Tensor& w);

// Drops every packed copy; returns how many there were.
int64_t clear_weight_cache();

}  // namespace qbert::cpu
