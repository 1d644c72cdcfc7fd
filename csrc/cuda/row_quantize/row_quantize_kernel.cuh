// Per-row kernels on CUDA, one templated kernel for two ops. Torch-free: raw pointers, a Params struct and
// a cudaStream_t; the torch-facing launcher is row_quantize.cu. Specs: qbert/ops/add_layernorm_quantize.py
// and qbert/ops/quantize_per_token.py.
//
//   kNormalize (add_layernorm_quantize): h = x (+ residual, the f32 sum rounded to T: for f16 / bf16 that
//     is the correctly rounded sum PyTorch's add gives, as f32's 24 bits >= 2p + 2); in one pass max |h|
//     (common/cuda_token_quant.cuh's finite_abs: +inf for a row holding a NaN or an infinity, which gives
//     y = NaN, codes 0, scale NaN) and the sum of h in f64 (exact for a constant row: K copies of a 24-bit
//     value need at most 24 + log2 K < 53 bits); a row with max |h| > kUnscaledMax is multiplied by a power
//     of two c that brings it into [2, 4) (exact), and eps by c^2, so that its sum of squares cannot
//     overflow; mean = f32(sum / K * c); the variance as the mean of (h - mean)^2 (a second pass: no
//     cancellation as in E[h^2] - mean^2); y = ((h - mean) * rstd) * w + b rounded to T and written; then
//     the codes of that rounded y.
//   !kNormalize (quantize_per_token, and w4a8_linear's activations through launch_quantize_per_token):
//     the codes of x.
//   Codes: quantize_per_token's rule (common/cuda_token_quant.cuh): scale = amax / 127 (1 where that is 0,
//     NaN for a non-finite row), q = clamp(rint(v / scale), +-127) (0 for a NaN scale): bit-exact with
//     quantize_per_token_reference, as both divisions are correctly rounded and rint rounds half to even.
//
// Every float operation is an explicit _rn intrinsic, so nvcc cannot contract or approximate any of them
// (whatever -use_fast_math or -fmad say): the rounding sequence is the one written here on every arch.
// rstd is 1 / sqrt(var + eps) with an IEEE sqrt and division, not rsqrtf (approximate). y agrees with
// the exact LayerNorm to f32 rounding, not bit for bit.
//
// Paths, chosen by K:
//   warp  K <= 1024 (BERT rows are 768 / 1024): a warp per row holds the row in registers (32 values a
//         lane) between the reductions, which are warp shuffles only: the row is read once.
//   block K > 1024: a block of 256 threads per row, for any K; each pass re-reads the row (from L1 / L2:
//         rows are a few KiB), and the codes re-read the y this thread has just written.
// Both take 16-byte vectors when every row and parameter is 16-byte aligned and K is a multiple of the
// vector, else single elements (kVectorized).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "common/cuda_reduce.cuh"
#include "common/cuda_token_quant.cuh"

namespace qbert::cuda::row_quantize {

struct Params {
  const void* x;         // [M, K] T
  const void* residual;  // [M, K] T, or nullptr
  const float* weight;   // [K], or nullptr: quantize only (no LayerNorm; y is not written)
  const float* bias;     // [K], or nullptr
  void* y;               // [M, K] T, written by the LayerNorm only
  int8_t* q;             // [M, ldq] codes; columns K .. ldq-1 are written 0
  float* scale;          // [M] per-row scales
  int M, K;
  float eps;
  int ldq;               // row stride of q, >= K: K, or W4A8's rows padded to whole chunks
};

constexpr int kVecBytes = 16;             // the widest load / store a thread issues (LDG.E.128)
constexpr int kWarpRowElems = 32;         // row values a lane holds in registers on the warp path
constexpr int kWarpRowMaxK = kWarpSize * kWarpRowElems;  // 1024
// Warp path: 4 warps (rows) a block. One-warp blocks would cap an SM at 32 resident warps (sm_80 and
// sm_90 keep at most 32 blocks per SM), half of its 64.
constexpr int kRowsPerBlock = 4;
// Block path: a K = 4096 row is 2 (f16 / bf16) or 4 (f32) 16-byte vectors a thread per pass.
constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
// The largest max |h| normalized as it is: then |h - mean| <= 2^33, and K (2^33)^2 stays below f32's max
// (2^128) for every K. Rows of larger values are scaled by a power of two first.
constexpr float kUnscaledMax = 4294967296.f;  // 2^32
constexpr unsigned kExponentMask = 0x7f800000u;  // f32's exponent field: v & it is 2^e for v = m 2^e
constexpr float kScaledMin = 2.f;                 // a scaled row's max |h| lies in [2, 4)

// N elements loaded or stored as one access: 16-byte aligned when that is the size, else naturally.
template <class E, int N>
struct alignas(sizeof(E) * N < kVecBytes ? sizeof(E) * N : kVecBytes) Pack {
  E v[N];
};

template <class T, bool kVectorized>
constexpr int vec_elems() { return kVectorized ? kVecBytes / static_cast<int>(sizeof(T)) : 1; }

// ---- reductions (deterministic: a fixed tree; the xor butterfly leaves the same bits in every lane) ----

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <class V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = add_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The sum (kMax false) or max (float only) of v over the block, returned to every thread. `partial` is
// kBlockWarps values of shared memory. Contains barriers: every thread of the block must call it.
template <bool kMax, class V>
__device__ __forceinline__ V block_allreduce(V v, V* partial) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if constexpr (kMax) v = warp_max(v);
  else v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < kBlockWarps; ++w) {
    if constexpr (kMax) v = fmaxf(v, partial[w]);
    else v = add_rn(v, partial[w]);
  }
  __syncthreads();  // the next call overwrites partial
  return v;
}

// The power of two c a row with max |h| = h_max = m 2^e (m in [1, 2)) is multiplied by: 1 for most rows
// (see the top of the file), else 2 / 2^e, which brings h_max into [2, 4). c is a normal float for every
// finite h_max (c >= 2^-126) and the division is exact, so multiplying by c is exact barring underflow.
__device__ __forceinline__ float row_factor(float h_max) {
  if (!token::finite_row(h_max) || !(h_max > kUnscaledMax)) return 1.f;
  return __fdiv_rn(kScaledMin, __uint_as_float(__float_as_uint(h_max) & kExponentMask));
}

// ---- per-vector steps, shared by both paths (so both round identically) ----------------------------

// v = row[i * kVec .. i * kVec + kVec) as f32.
template <class T, int kVec>
__device__ __forceinline__ void load_vec(const T* row, int i, float (&v)[kVec]) {
  const Pack<T, kVec> pack = reinterpret_cast<const Pack<T, kVec>*>(row)[i];
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = to_float(pack.v[j]);
}

// h = x (+ residual, summed in f32 and rounded to T) of vector i of the row at element offset `row`.
template <class T, bool kResidual, int kVec>
__device__ __forceinline__ void load_h(const Params& p, size_t row, int i, float (&h)[kVec]) {
  load_vec<T, kVec>(static_cast<const T*>(p.x) + row, i, h);
  if constexpr (kResidual) {
    float r[kVec];
    load_vec<T, kVec>(static_cast<const T*>(p.residual) + row, i, r);
#pragma unroll
    for (int j = 0; j < kVec; ++j) h[j] = to_float(from_float<T>(__fadd_rn(h[j], r[j])));
  }
}

// The row's mean from its f64 sum of unscaled h and its factor c: f32(sum / K * c) (c a power of two).
__device__ __forceinline__ float mean_of(double sum, int K, float c) {
  return __double2float_rn(__dmul_rn(__ddiv_rn(sum, static_cast<double>(K)), static_cast<double>(c)));
}

// rstd = 1 / sqrt(var + eps). var + eps is 0 only for a constant row (h - mean = 0: the f64 mean is exact)
// of scaled values whose scaled eps underflowed; any finite rstd then gives y = bias, as the reference.
__device__ __forceinline__ float rstd_of(float sum_sq, int K, float eps) {
  const float var_eps = __fadd_rn(__fdiv_rn(sum_sq, static_cast<float>(K)), eps);
  return var_eps > 0.f ? __fdiv_rn(1.f, __fsqrt_rn(var_eps)) : 0.f;
}

template <int kVec>
__device__ __forceinline__ void scale_by(float (&h)[kVec], float c) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) h[j] = __fmul_rn(h[j], c);
}

// y = ((h - mean) * rstd) * w + b (NaN for a non-finite row), rounded to T and stored; h becomes that
// rounded y (what is quantized).
template <class T, int kVec>
__device__ __forceinline__ void normalize_store(const Params& p, size_t row, int i, float mean, float rstd,
                                                bool finite, float (&h)[kVec]) {
  const Pack<float, kVec> w = reinterpret_cast<const Pack<float, kVec>*>(p.weight)[i];
  Pack<float, kVec> b{};  // no bias: fma(n, w, 0) is n * w rounded once, as the reference's n * w
  if (p.bias != nullptr) b = reinterpret_cast<const Pack<float, kVec>*>(p.bias)[i];
  Pack<T, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float n = __fmul_rn(__fsub_rn(h[j], mean), rstd);
    out.v[j] = from_float<T>(finite ? __fmaf_rn(n, w.v[j], b.v[j]) : CUDART_NAN_F);
    h[j] = to_float(out.v[j]);
  }
  reinterpret_cast<Pack<T, kVec>*>(static_cast<T*>(p.y) + row)[i] = out;
}

template <int kVec>
__device__ __forceinline__ void quantize_store(int8_t* q_row, int i, float scale, const float (&v)[kVec]) {
  Pack<int8_t, kVec> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) out.v[j] = token::code_of(v[j], scale);
  reinterpret_cast<Pack<int8_t, kVec>*>(q_row)[i] = out;
}

// ---- the two paths -----------------------------------------------------------------------------------

template <class T, bool kResidual, bool kNormalize, bool kVectorized>
__device__ __forceinline__ void warp_row(const Params& p, int row_index) {
  constexpr int kVec = vec_elems<T, kVectorized>();
  constexpr int kSlots = kWarpRowElems / kVec;  // vectors a lane holds
  const int lane = threadIdx.x % kWarpSize;
  const size_t row = static_cast<size_t>(row_index) * p.K;
  int8_t* const q_row = p.q + static_cast<size_t>(row_index) * p.ldq;
  const int n_vecs = p.K / kVec;  // exact: the vectorized path needs K % kVec == 0
  // Slot s of lane l is vector s * 32 + l: each slot is one coalesced sweep of the warp over the row.
  float h[kSlots][kVec] = {};  // [slot][element]; unused slots stay 0 and are skipped below
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
    if (s * kWarpSize + lane < n_vecs) load_h<T, kResidual, kVec>(p, row, s * kWarpSize + lane, h[s]);

  if constexpr (kNormalize) {
    float h_max = 0.f;  // unused slots are 0
    double sum = 0.0;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        h_max = fmaxf(h_max, token::finite_abs(h[s][j]));
        sum = __dadd_rn(sum, static_cast<double>(h[s][j]));
      }
    h_max = warp_max(h_max);  // the same in every lane: the branches below are warp-uniform
    const bool finite = token::finite_row(h_max);
    const float c = row_factor(h_max);
    const float mean = mean_of(warp_sum(sum), p.K, c);
    if (c != 1.f) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) scale_by(h[s], c);
    }
    float sum_sq = 0.f;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (s * kWarpSize + lane >= n_vecs) continue;  // an unused slot's 0 - mean is not part of the row
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = __fsub_rn(h[s][j], mean);
        sum_sq = __fmaf_rn(d, d, sum_sq);
      }
    }
    const float rstd = rstd_of(warp_sum(sum_sq), p.K, __fmul_rn(__fmul_rn(p.eps, c), c));
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (s * kWarpSize + lane < n_vecs)
        normalize_store<T, kVec>(p, row, s * kWarpSize + lane, mean, rstd, finite, h[s]);
  }

  float amax = 0.f;
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, token::finite_abs(h[s][j]));
  const float scale = token::scale_of(warp_max(amax));
#pragma unroll
  for (int s = 0; s < kSlots; ++s)
    if (s * kWarpSize + lane < n_vecs) quantize_store<kVec>(q_row, s * kWarpSize + lane, scale, h[s]);
  for (int k = p.K + lane; k < p.ldq; k += kWarpSize) q_row[k] = 0;  // the padding columns
  if (lane == 0) p.scale[row_index] = scale;
}

template <class T, bool kResidual, bool kNormalize, bool kVectorized>
__device__ __forceinline__ void block_row(const Params& p, int row_index) {
  constexpr int kVec = vec_elems<T, kVectorized>();
  __shared__ float partial[kBlockWarps];
  __shared__ double partial_f64[kBlockWarps];
  const size_t row = static_cast<size_t>(row_index) * p.K;
  const int n_vecs = p.K / kVec;
  float h[kVec];

  float mean = 0.f, rstd = 0.f, c = 1.f;
  bool finite = true;
  if constexpr (kNormalize) {
    float h_max = 0.f;
    double sum = 0.0;
    for (int i = threadIdx.x; i < n_vecs; i += kBlockThreads) {
      load_h<T, kResidual, kVec>(p, row, i, h);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        h_max = fmaxf(h_max, token::finite_abs(h[j]));
        sum = __dadd_rn(sum, static_cast<double>(h[j]));
      }
    }
    h_max = block_allreduce<true>(h_max, partial);
    finite = token::finite_row(h_max);
    c = row_factor(h_max);
    mean = mean_of(block_allreduce<false>(sum, partial_f64), p.K, c);
    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < n_vecs; i += kBlockThreads) {
      load_h<T, kResidual, kVec>(p, row, i, h);
      scale_by(h, c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = __fsub_rn(h[j], mean);
        sum_sq = __fmaf_rn(d, d, sum_sq);
      }
    }
    rstd = rstd_of(block_allreduce<false>(sum_sq, partial), p.K, __fmul_rn(__fmul_rn(p.eps, c), c));
  }

  float amax = 0.f;
  for (int i = threadIdx.x; i < n_vecs; i += kBlockThreads) {
    load_h<T, kResidual, kVec>(p, row, i, h);
    if constexpr (kNormalize) {
      scale_by(h, c);
      normalize_store<T, kVec>(p, row, i, mean, rstd, finite, h);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, token::finite_abs(h[j]));
  }
  const float scale = token::scale_of(block_allreduce<true>(amax, partial));
  // What is quantized: the rounded y, which this thread itself wrote (same vectors i), or x.
  const T* src = static_cast<const T*>(kNormalize ? p.y : p.x) + row;
  int8_t* const q_row = p.q + static_cast<size_t>(row_index) * p.ldq;
  // The padding columns K .. ldq-1 in the same loop, as whole vectors (the vectorized path needs ldq % kVec
  // == 0): a separate loop after this one made ptxas spill around the divisions' slow-path calls (sm_90a).
  for (int i = threadIdx.x; i < p.ldq / kVec; i += kBlockThreads) {
    if (i < n_vecs) {
      load_vec<T, kVec>(src, i, h);
      quantize_store<kVec>(q_row, i, scale, h);
    } else {
      reinterpret_cast<Pack<int8_t, kVec>*>(q_row)[i] = Pack<int8_t, kVec>{};
    }
  }
  if (threadIdx.x == 0) p.scale[row_index] = scale;
}

template <class T, bool kResidual, bool kNormalize, bool kVectorized, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kRowsPerBlock * kWarpSize : kBlockThreads)
    row_quantize_kernel(const Params p) {
  static_assert(kNormalize || !kResidual, "the residual add exists only before the LayerNorm");
  if constexpr (kWarpPerRow) {
    // int64: the last block's spare warps may index past M = INT32_MAX.
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
    if (row < p.M) warp_row<T, kResidual, kNormalize, kVectorized>(p, static_cast<int>(row));  // no block barrier
  } else {
    block_row<T, kResidual, kNormalize, kVectorized>(p, blockIdx.x);
  }
}

// ---- host side ---------------------------------------------------------------------------------------

// Whether every row and parameter can be read and written in 16-byte vectors (nullptr counts as aligned).
template <class T>
inline bool vectorizable(const Params& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; };
  return p.K % vec_elems<T, true>() == 0 && p.ldq % vec_elems<T, true>() == 0 && aligned(p.x) &&
         aligned(p.residual) && aligned(p.weight) && aligned(p.bias) && aligned(p.y) && aligned(p.q);
}

template <class T, bool kResidual, bool kNormalize, bool kVectorized>
cudaError_t launch_path(const Params& p, cudaStream_t stream) {
  if (p.K <= kWarpRowMaxK) {
    const auto blocks = static_cast<unsigned>((static_cast<int64_t>(p.M) + kRowsPerBlock - 1) / kRowsPerBlock);
    row_quantize_kernel<T, kResidual, kNormalize, kVectorized, true>
        <<<blocks, kRowsPerBlock * kWarpSize, 0, stream>>>(p);
  } else {
    row_quantize_kernel<T, kResidual, kNormalize, kVectorized, false><<<p.M, kBlockThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class T, bool kResidual, bool kNormalize>
cudaError_t launch_aligned_or_not(const Params& p, cudaStream_t stream) {
  return vectorizable<T>(p) ? launch_path<T, kResidual, kNormalize, true>(p, stream)
                            : launch_path<T, kResidual, kNormalize, false>(p, stream);
}

// add_layernorm_quantize when p.weight is set (with the residual add when p.residual is), else
// quantize_per_token. p.M >= 0, p.K >= 1, p.ldq >= p.K.
template <class T>
cudaError_t launch_row_quantize(const Params& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  if (p.weight == nullptr) return launch_aligned_or_not<T, false, false>(p, stream);
  if (p.residual != nullptr) return launch_aligned_or_not<T, true, true>(p, stream);
  return launch_aligned_or_not<T, false, true>(p, stream);
}

// x_q, x_scale = quantize_per_token(x) for x [M, K] of T, into x_q [M, ldq] (ldq >= K; columns K .. ldq-1
// written 0) and x_scale [M]. w4a8_linear's activation quantizer (lowbit_linear.cu): its mma path reads
// rows padded to whole chunks.
template <class T>
cudaError_t launch_quantize_per_token(const T* x, int M, int K, int ldq, int8_t* x_q, float* x_scale,
                                      cudaStream_t stream) {
  const Params p{x, nullptr, nullptr, nullptr, nullptr, x_q, x_scale, M, K, 0.f, ldq};
  return launch_row_quantize<T>(p, stream);
}

}  // namespace qbert::cuda::row_quantize
