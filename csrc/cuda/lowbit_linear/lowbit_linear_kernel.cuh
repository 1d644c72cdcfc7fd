// lowbit_linear (W{2,3,4,8}A16) and w4a8_linear (W{2,3,4}A8) on CUDA. Torch-free: raw pointers, a
// Params struct and a cudaStream_t; the torch-facing launcher is lowbit_linear.cu. Specs:
// qbert/ops/lowbit_linear.py and qbert/ops/w4a8_linear.py; packed layout: qbert/quant/packing.py.
//
// Paths (plan_launch picks one by dtype and M):
//   kSmallM  M <= 16, f16/bf16 (mma m16n8k16) or W4A8 (mma m16n8k32 s8). Memory bound: the weight is
//            streamed Marlin-style through a 4-stage cp.async pipeline of 16-byte copies in its packed
//            layout, dequantized in registers once per warp, and K is split over CTAs (split-K) until
//            the GPU is full; partial sums go to a float32 workspace reduced in split order by a
//            second kernel (deterministic, no atomics).
//   kLargeM  M > 16, same kernel with 128 x 64 tiles of 8 warps: compute bound, each dequantized B
//            fragment feeds 2 m16 tiles.
//   kSimt    float32 activations at any M (there is no IEEE-f32 tensor-core MMA): FMAs over weights
//            dequantized exactly as the reference does ((u - z) * s in f32), split-K as above.
//   W4A8 first quantizes x per token to int8 with quantize_per_token's own kernels
//            (row_quantize_kernel.cuh's launch_quantize_per_token, called by lowbit_linear.cu).
// sm_90a runs the sm_80 mma.sync path (no wgmma / TMA yet).
//
// Scales: each K group is accumulated on its own (f32 for A16, exact s32 for A8) and folded in at the
// group's end, y += float(acc_g) * s_g: for A16 the tensor cores then see exact integer weights
// (u - z), so the only roundings are the f32 accumulation; for A8 this is the op's definition.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "common/constants.h"
#include "common/cuda_mma.cuh"
#include "cuda/lowbit_linear/lowbit_unpack.cuh"

namespace qbert::cuda::lowbit {

struct Params {
  const void* x;          // [M, lda] activations T (A16), or int8 x_q (A8); columns >= K read as zero
  const int32_t* w;       // w_packed [chunks * BITS, N]
  const float* scales;    // [groups, N]
  const uint8_t* zeros;   // [groups, N], or nullptr: symmetric codes, zero point 2^(BITS-1)
  const float* bias;      // [N] or nullptr (the launcher converts any float bias to f32)
  const float* x_scale;   // [M] per-token scales (A8), else nullptr
  void* out;              // [M, N] T
  float* partial;         // [splits, M, N] f32 workspace when splits > 1
  int M, N;
  int lda;                // row stride of x in elements; a multiple of 16 bytes on the mma paths
  int chunks;             // ceil(K / 32)
  int group_chunks;       // chunks per K group: ceil(group_size / 32) (>= chunks for one group per row)
  int groups;             // ceil(chunks / group_chunks) = ceil(K / group_size)
  int splits;             // CTAs along K (grid.z)
  int split_chunks;       // chunks per split, a multiple of the path's tile depth
};

__host__ __device__ constexpr int symmetric_zero(int bits) { return 1 << (bits - 1); }  // lowbit.implicit_zero
constexpr int kWordsPerVector = 4;    // int32 words per 16-byte copy

// ---- epilogue shared by every path -----------------------------------------------------------------

// out = (y * x_scale[row] + bias[col]).to(T), or y into the split's workspace slice.
template <class T>
__device__ __forceinline__ void finalize(const Params& p, int row, int col, float y) {
  if (p.x_scale != nullptr) y *= p.x_scale[row];
  if (p.bias != nullptr) y += p.bias[col];
  static_cast<T*>(p.out)[static_cast<size_t>(row) * p.N + col] = from_float<T>(y);
}

template <class T>
__device__ __forceinline__ void store_result(const Params& p, int split, int row, int col, float y) {
  if (row >= p.M || col >= p.N) return;
  if (p.splits == 1) finalize<T>(p, row, col, y);
  else p.partial[(static_cast<size_t>(split) * p.M + row) * p.N + col] = y;
}

constexpr int kReduceThreads = 256;

// Sums the splits in order (deterministic) and finalizes. One thread per output element.
template <class T>
__global__ void __launch_bounds__(kReduceThreads) split_reduce_kernel(const Params p) {
  const size_t i = static_cast<size_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  const size_t mn = static_cast<size_t>(p.M) * p.N;
  if (i >= mn) return;
  float y = 0.f;
  for (int s = 0; s < p.splits; ++s) y += p.partial[s * mn + i];
  finalize<T>(p, static_cast<int>(i / p.N), static_cast<int>(i % p.N), y);
}

// ---- tensor-core path ------------------------------------------------------------------------------

template <int BLOCK_M_, int BLOCK_N_, int CHUNKS_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TileConfig {
  static constexpr int BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_;
  static constexpr int CHUNKS = CHUNKS_;  // K chunks per pipeline stage: BLOCK_K = 32 * CHUNKS
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int kThreads = WARPS_M * WARPS_N * kWarpSize;
  static constexpr int MT = BLOCK_M / WARPS_M / 16;  // m16 tiles per warp
  static constexpr int NT = BLOCK_N / WARPS_N / 8;   // n8 tiles per warp
  static_assert(MT >= 1 && NT >= 1 && BLOCK_M == MT * 16 * WARPS_M && BLOCK_N == NT * 8 * WARPS_N, "tiling");
};

// Few tokens: one m16 tile (rows >= M are zero-filled), 4 warps side by side along N, 128 K per stage
// and 4 stages: ~3 stages of weights in flight per CTA keep HBM busy with 2 CTAs per SM.
using SmallMConfig = TileConfig<16, 128, 4, 1, 4, 4>;
// Many tokens: 128 x 64 tiles, 8 warps of 32 x 32 (2 x 4 mma tiles: each dequantized B fragment feeds
// 2 MMAs per K step). A warp holds two accumulator sets (the group's and the folded y), so 64 x 32 warp
// tiles would need ~255 registers; 32 x 32 leaves room. A16 stages 64 K (128 bytes of f16 per row),
// A8 128 K (128 bytes of int8): the A swizzle wants whole 128-byte rows.
using LargeMA16Config = TileConfig<128, 64, 2, 4, 2, 4>;
using LargeMA8Config = TileConfig<128, 64, 4, 4, 2, 3>;

// Shared-memory geometry of one stage: the A tile [BLOCK_M, BLOCK_K] (row-major, swizzled by chunks)
// and the B tile, w_packed rows [CHUNKS * BITS, BLOCK_N + kBPad] as packed (N contiguous).
template <class Cfg, int BITS, class A>
struct MmaSmem {
  // A: a thread reads the 32 / 4 = 8 consecutive K values of its chunk quarter (16 bytes of f16, 8 of
  // int8). The 8 (f16) or 16 (int8) lanes that share a shared-memory wavefront read kChunksPerLine
  // different rows at the same chunk; XOR-ing the chunk index with the row puts those rows in
  // different quarters of the 128-byte bank line, so the reads are conflict-free.
  static constexpr int kChunkBytes = kPackChunk * sizeof(A);       // 64 (f16) or 32 (int8)
  static constexpr int kRowBytes = Cfg::CHUNKS * kChunkBytes;      // 128 or 256
  static constexpr int kBankLine = 128;
  static constexpr int kChunksPerLine = kBankLine / kChunkBytes;   // 2 or 4
  static_assert(Cfg::CHUNKS % kChunksPerLine == 0, "the swizzle stays inside a row");
  static constexpr int kABytes = Cfg::BLOCK_M * kRowBytes;
  // B: the 4 lanes of a column read different word rows (rows t, t/2 or 2t+s, see chunk_quad); a row
  // stride of 8 banks mod 32 spreads 4 rows, 4 banks mod 32 the 8-bit rows 0, 2, 4, 6.
  static constexpr int kBPad = BITS == 8 ? 4 : 8;                   // words
  static constexpr int kBStride = Cfg::BLOCK_N + kBPad;            // words, a multiple of 4 (16 bytes)
  static constexpr int kBRows = Cfg::CHUNKS * BITS;
  static constexpr int kBBytes = kBRows * kBStride * 4;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBytes = Cfg::STAGES * kStageBytes;

  __device__ static int a_offset(int row, int chunk) {  // byte offset of a row's chunk
    return row * kRowBytes + (chunk ^ (row % kChunksPerLine)) * kChunkBytes;
  }
};

// Copies the K tile starting at chunk `chunk0` (A rows m0.., B columns n0..) into one pipeline stage.
template <class Cfg, int BITS, class A>
__device__ __forceinline__ void load_stage(const Params& p, unsigned char* stage, int m0, int n0, int chunk0) {
  using S = MmaSmem<Cfg, BITS, A>;
  constexpr int kElemsPerCopy = kCpAsyncBytes / sizeof(A);
  constexpr int kCopiesPerChunk = S::kChunkBytes / kCpAsyncBytes;
  constexpr int kACopies = Cfg::BLOCK_M * Cfg::CHUNKS * kCopiesPerChunk;
  const A* x = static_cast<const A*>(p.x);
  for (int i = threadIdx.x; i < kACopies; i += Cfg::kThreads) {
    const int r = i / (Cfg::CHUNKS * kCopiesPerChunk), c = i % (Cfg::CHUNKS * kCopiesPerChunk);
    const int k = (chunk0 + c / kCopiesPerChunk) * kPackChunk + (c % kCopiesPerChunk) * kElemsPerCopy;
    const bool valid = m0 + r < p.M && k < p.lda;
    const A* src = valid ? x + static_cast<size_t>(m0 + r) * p.lda + k : x;
    cp_async_16(stage + S::a_offset(r, c / kCopiesPerChunk) + (c % kCopiesPerChunk) * kCpAsyncBytes, src, valid);
  }
  uint32_t* b = reinterpret_cast<uint32_t*>(stage + S::kABytes);
  const int row0 = chunk0 * BITS, rows = p.chunks * BITS;
  if (p.N % kWordsPerVector == 0) {  // rows are 16-byte aligned: whole vectors, each in or out of range
    constexpr int kVectors = Cfg::BLOCK_N / kWordsPerVector;
    for (int i = threadIdx.x; i < S::kBRows * kVectors; i += Cfg::kThreads) {
      const int r = i / kVectors, col = n0 + (i % kVectors) * kWordsPerVector;
      const bool valid = row0 + r < rows && col < p.N;
      const int32_t* src = valid ? p.w + static_cast<size_t>(row0 + r) * p.N + col : p.w;
      cp_async_16(b + r * S::kBStride + (i % kVectors) * kWordsPerVector, src, valid);
    }
  } else {  // ragged N: word by word
    for (int i = threadIdx.x; i < S::kBRows * Cfg::BLOCK_N; i += Cfg::kThreads) {
      const int r = i / Cfg::BLOCK_N, col = n0 + i % Cfg::BLOCK_N;
      const bool valid = row0 + r < rows && col < p.N;
      const int32_t* src = valid ? p.w + static_cast<size_t>(row0 + r) * p.N + col : p.w;
      cp_async_4(b + r * S::kBStride + i % Cfg::BLOCK_N, src, valid);
    }
  }
}

// The scale / zero operands of one K group for a warp's NT column tiles: the zero point of the B
// column the thread dequantizes (col g) and the scales of the two C columns it owns (cols 2t, 2t+1).
template <int NT>
struct GroupOperands {
  uint32_t zero[NT];
  float scale[NT][2];
};

template <int NT, int BITS, class ZeroFn>
__device__ __forceinline__ GroupOperands<NT> load_group(const Params& p, int group, int col0, int lane,
                                                        ZeroFn&& zero_word) {
  GroupOperands<NT> ops;
  const int g = lane / 4, t = lane % 4;
  const size_t base = static_cast<size_t>(group) * p.N;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int cb = col0 + nt * 8 + g;
    uint32_t z = symmetric_zero(BITS);
    if (p.zeros != nullptr) z = cb < p.N ? p.zeros[base + cb] : 0;
    ops.zero[nt] = zero_word(z);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int cc = col0 + nt * 8 + 2 * t + i;
      ops.scale[nt][i] = cc < p.N ? p.scales[base + cc] : 0.f;
    }
  }
  return ops;
}

// One CTA computes a BLOCK_M x BLOCK_N tile of out over the chunks of split blockIdx.z.
// Grid: (ceil(N / BLOCK_N), ceil(M / BLOCK_M), splits). T: activation / output type; A8: the A operand
// is the int8 x_q (mma m16n8k32 s8), else T (mma m16n8k16).
//
// K renumbering (see cuda_mma.cuh): thread t of a group handles logical K values 8t .. 8t+7 of every
// 32-code chunk, i.e. quads 2t and 2t+1. A16: mma step s in {0, 1} takes quad 2t+s (its a[0]/a[1]
// pair = K 8t+4s, 8t+4s+1; a[2]/a[3] = 8t+4s+2, 8t+4s+3); A8: b[0] = quad 2t, b[1] = quad 2t+1. So one
// 16-byte (f16) or 8-byte (int8) shared load per row gives a thread its A values for the chunk, and one
// shift + mask of a packed word gives its B values: the byte-sliced layout was built for this.
template <class Cfg, int BITS, class T, bool A8>
__global__ void __launch_bounds__(Cfg::kThreads) lowbit_mma_kernel(const Params p) {
  using A = std::conditional_t<A8, int8_t, T>;
  using S = MmaSmem<Cfg, BITS, A>;
  using Acc = std::conditional_t<A8, int, float>;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  static_assert(!A8 || W4A8Bits::contains(BITS), "W4A8: u - z must fit an int8 (W4A8Bits)");
  extern __shared__ __align__(16) unsigned char smem[];

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  const int m0 = blockIdx.y * Cfg::BLOCK_M, n0 = blockIdx.x * Cfg::BLOCK_N;
  const int wm0 = warp_m * MT * 16, wn0 = warp_n * NT * 8;  // the warp's tile inside the CTA's
  const int c_begin = blockIdx.z * p.split_chunks;
  const int c_end = min(c_begin + p.split_chunks, p.chunks);
  const int tiles = (c_end - c_begin + Cfg::CHUNKS - 1) / Cfg::CHUNKS;

  auto zero_word = [](uint32_t z) {
    if constexpr (A8) return z * kByteOnes;
    else return Dequant16<T, BITS>::zero_word(z);
  };
  int group = c_begin / p.group_chunks;
  GroupOperands<NT> cur = load_group<NT, BITS>(p, group, n0 + wn0, lane, zero_word);
  // The next group's operands are fetched a whole group ahead, so their latency hides behind its MMAs.
  GroupOperands<NT> next = cur;
  if (group + 1 < p.groups) next = load_group<NT, BITS>(p, group + 1, n0 + wn0, lane, zero_word);

  Acc acc[MT][NT][4] = {};
  float y[MT][NT][4] = {};
  auto fold_group = [&]() {  // y += float(acc_g) * s_g; acc = 0
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          y[mt][nt][i] = fmaf(static_cast<float>(acc[mt][nt][i]), cur.scale[nt][i % 2], y[mt][nt][i]);
          acc[mt][nt][i] = 0;
        }
  };

  // Pipeline prologue: STAGES-1 tiles in flight. Every thread commits a group per tile, empty or not,
  // so that wait_group counts line up.
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < tiles) load_stage<Cfg, BITS, A>(p, smem + s * S::kStageBytes, m0, n0, c_begin + s * Cfg::CHUNKS);
    cp_async_commit();
  }

  for (int kt = 0; kt < tiles; ++kt) {
    // Tile kt has landed once at most STAGES-2 younger groups are pending; the barrier makes every
    // thread's copies visible and also tells us all warps are done with tile kt-1, whose stage the
    // copy issued next overwrites.
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    const int ahead = kt + Cfg::STAGES - 1;
    if (ahead < tiles)
      load_stage<Cfg, BITS, A>(p, smem + (ahead % Cfg::STAGES) * S::kStageBytes, m0, n0,
                               c_begin + ahead * Cfg::CHUNKS);
    cp_async_commit();

    const unsigned char* a_s = smem + (kt % Cfg::STAGES) * S::kStageBytes;
    const uint32_t* b_s = reinterpret_cast<const uint32_t*>(a_s + S::kABytes);
#pragma unroll
    for (int cc = 0; cc < Cfg::CHUNKS; ++cc) {
      const int c = c_begin + kt * Cfg::CHUNKS + cc;
      if (c >= c_end) break;  // uniform over the CTA
      if (c / p.group_chunks != group) {
        fold_group();
        ++group;
        cur = next;
        if (group + 1 < p.groups) next = load_group<NT, BITS>(p, group + 1, n0 + wn0, lane, zero_word);
      }
      // A fragments: rows g and g+8 of each m16 tile, K 8t .. 8t+7 of the chunk.
      constexpr int kARegs = S::kChunkBytes / 4 / sizeof(uint32_t);  // a thread's quarter of a row's chunk
      uint32_t a[MT][2][kARegs];  // [m16 tile][row g, g+8][4 regs of f16x2 or 2 of s8x4]
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm0 + mt * 16 + g + 8 * h;
          const unsigned char* src = a_s + S::a_offset(r, cc) + t * (S::kChunkBytes / 4);
          if constexpr (A8) {
            const uint2 v = *reinterpret_cast<const uint2*>(src);
            a[mt][h][0] = v.x, a[mt][h][1] = v.y;
          } else {
            const uint4 v = *reinterpret_cast<const uint4*>(src);
            a[mt][h][0] = v.x, a[mt][h][1] = v.y, a[mt][h][2] = v.z, a[mt][h][3] = v.w;
          }
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t* col = b_s + cc * BITS * S::kBStride + wn0 + nt * 8 + g;
        auto word = [&](int i) { return col[i * S::kBStride]; };
        const uint32_t q0 = chunk_quad<BITS>(2 * t, word), q1 = chunk_quad<BITS>(2 * t + 1, word);
        if constexpr (A8) {
          const uint32_t b[2] = {signed_quad(q0, cur.zero[nt]), signed_quad(q1, cur.zero[nt])};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint32_t af[4] = {a[mt][0][0], a[mt][1][0], a[mt][0][1], a[mt][1][1]};
            mma_m16n8k32_s8(acc[mt][nt], af, b);
          }
        } else {
          uint32_t b[2][2];
          Dequant16<T, BITS>::pairs(q0, cur.zero[nt], b[0]);
          Dequant16<T, BITS>::pairs(q1, cur.zero[nt], b[1]);
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const uint32_t af[4] = {a[mt][0][2 * s], a[mt][1][2 * s], a[mt][0][2 * s + 1], a[mt][1][2 * s + 1]};
              mma_m16n8k16<T>(acc[mt][nt], af, b[s]);
            }
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA (the trailing groups are empty, but say so)
  fold_group();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        store_result<T>(p, blockIdx.z, m0 + wm0 + mt * 16 + g + 8 * (i / 2), n0 + wn0 + nt * 8 + 2 * t + i % 2,
                        y[mt][nt][i]);
}

// ---- SIMT path (float32 activations) ---------------------------------------------------------------

constexpr int kSimtThreads = 64;
constexpr int kSimtCols = kWordsPerVector;  // columns per thread: one 16-byte load per w_packed row
constexpr int kSimtRows = 4;                // rows of x per CTA: each dequantized weight feeds 4 FMAs
constexpr int kSimtSlabChunks = 4;          // chunks of x staged in shared memory at a time
constexpr int kSimtSlabK = kSimtSlabChunks * kPackChunk;

// Grid: (ceil(N / (kSimtThreads * kSimtCols)), ceil(M / kSimtRows), splits).
template <int BITS>
__global__ void __launch_bounds__(kSimtThreads) lowbit_simt_kernel(const Params p) {
  __shared__ float x_s[kSimtRows][kSimtSlabK];
  const float* x = static_cast<const float*>(p.x);
  const int m0 = blockIdx.y * kSimtRows;
  const int col0 = (blockIdx.x * kSimtThreads + threadIdx.x) * kSimtCols;
  const int c_begin = blockIdx.z * p.split_chunks;
  const int c_end = min(c_begin + p.split_chunks, p.chunks);
  const bool vector_rows = p.N % kWordsPerVector == 0;

  float acc[kSimtRows][kSimtCols] = {};
  float scale[kSimtCols], zero[kSimtCols];
  int group = -1;
  for (int slab = c_begin; slab < c_end; slab += kSimtSlabChunks) {
    __syncthreads();  // every thread is done with the previous slab
    for (int i = threadIdx.x; i < kSimtRows * kSimtSlabK; i += kSimtThreads) {
      const int r = i / kSimtSlabK, k = slab * kPackChunk + i % kSimtSlabK;
      x_s[r][i % kSimtSlabK] = m0 + r < p.M && k < p.lda ? x[static_cast<size_t>(m0 + r) * p.lda + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int cs = 0; cs < kSimtSlabChunks; ++cs) {
      const int c = slab + cs;
      if (c >= c_end) break;
      if (c / p.group_chunks != group) {
        group = c / p.group_chunks;
#pragma unroll
        for (int j = 0; j < kSimtCols; ++j) {
          const int col = col0 + j;
          const size_t at = static_cast<size_t>(group) * p.N + col;
          scale[j] = col < p.N ? p.scales[at] : 0.f;
          const uint32_t z = p.zeros == nullptr ? symmetric_zero(BITS) : col < p.N ? p.zeros[at] : 0;
          zero[j] = __int_as_float(kF32Magic | z);
        }
      }
      uint32_t words[BITS][kSimtCols];
#pragma unroll
      for (int i = 0; i < BITS; ++i) {
        const int32_t* row = p.w + static_cast<size_t>(c * BITS + i) * p.N;
        if (vector_rows && col0 < p.N) {
          const int4 v = *reinterpret_cast<const int4*>(row + col0);
          words[i][0] = v.x, words[i][1] = v.y, words[i][2] = v.z, words[i][3] = v.w;
        } else {
#pragma unroll
          for (int j = 0; j < kSimtCols; ++j) words[i][j] = col0 + j < p.N ? row[col0 + j] : 0;
        }
      }
      // A chunk's 32 products are summed on their own, then added to acc: two short sums instead of
      // one K long, so the f32 rounding error stays near that of a blocked BLAS dot product.
      float chunk_sum[kSimtRows][kSimtCols] = {};
#pragma unroll
      for (int quad = 0; quad < kQuadsPerChunk; ++quad)
#pragma unroll
        for (int j = 0; j < kSimtCols; ++j) {
          const uint32_t codes = chunk_quad<BITS>(quad, [&](int i) { return words[i][j]; });
#pragma unroll
          for (int b = 0; b < kBytesPerWord; ++b) {
            const float w = code_minus_zero(codes, b, zero[j]) * scale[j];  // the reference's f32 weight
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r)
              chunk_sum[r][j] = fmaf(x_s[r][cs * kPackChunk + quad * kBytesPerWord + b], w, chunk_sum[r][j]);
          }
        }
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r)
#pragma unroll
        for (int j = 0; j < kSimtCols; ++j) acc[r][j] += chunk_sum[r][j];
    }
  }
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r)
#pragma unroll
    for (int j = 0; j < kSimtCols; ++j) store_result<float>(p, blockIdx.z, m0 + r, col0 + j, acc[r][j]);
}

// ---- host side: plan and launch ---------------------------------------------------------------------

enum class Path { kSmallM, kLargeM, kSimt };
constexpr int kSmallMMax = SmallMConfig::BLOCK_M;  // tokens up to which the streaming config runs
constexpr int kCtasPerSm = 2;                       // split-K fills the GPU up to this many CTAs per SM
constexpr int kMaxSplits = 32;                      // bounds the workspace and the reduction's reads

struct Tile {
  int block_m, block_n, chunks;
};

inline Tile tile_of(Path path, bool a8) {
  switch (path) {
    case Path::kSmallM: return {SmallMConfig::BLOCK_M, SmallMConfig::BLOCK_N, SmallMConfig::CHUNKS};
    case Path::kLargeM:
      return a8 ? Tile{LargeMA8Config::BLOCK_M, LargeMA8Config::BLOCK_N, LargeMA8Config::CHUNKS}
                : Tile{LargeMA16Config::BLOCK_M, LargeMA16Config::BLOCK_N, LargeMA16Config::CHUNKS};
    default: return {kSimtRows, kSimtThreads * kSimtCols, kSimtSlabChunks};
  }
}

struct Plan {
  Path path;
  int splits, split_chunks;
};

// f32 activations (A16) take the SIMT path; otherwise M picks the tile. K is split when the output
// tiles alone leave SMs idle; every split gets the same whole number of tile depths.
inline Plan plan_launch(int M, int N, int chunks, bool a8, bool f32_activations, int sm_count) {
  const Path path = !a8 && f32_activations ? Path::kSimt : M <= kSmallMMax ? Path::kSmallM : Path::kLargeM;
  const Tile tile = tile_of(path, a8);
  const long ctas = static_cast<long>((M + tile.block_m - 1) / tile.block_m) * ((N + tile.block_n - 1) / tile.block_n);
  const int depths = (chunks + tile.chunks - 1) / tile.chunks;
  const long wanted = (static_cast<long>(sm_count) * kCtasPerSm + ctas - 1) / ctas;
  const int splits = static_cast<int>(std::clamp<long>(wanted, 1, std::min(depths, kMaxSplits)));
  const int split_chunks = (depths + splits - 1) / splits * tile.chunks;
  return {path, (chunks + split_chunks - 1) / split_chunks, split_chunks};
}

template <class Cfg, int BITS, class T, bool A8>
cudaError_t launch_mma(const Params& p, cudaStream_t stream) {
  constexpr int kSmem = MmaSmem<Cfg, BITS, std::conditional_t<A8, int8_t, T>>::kBytes;
  auto kernel = lowbit_mma_kernel<Cfg, BITS, T, A8>;
  // Above 48 KB of dynamic shared memory a kernel must opt in.
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem)) return e;
  const dim3 grid((p.N + Cfg::BLOCK_N - 1) / Cfg::BLOCK_N, (p.M + Cfg::BLOCK_M - 1) / Cfg::BLOCK_M, p.splits);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_split_reduce(const Params& p, cudaStream_t stream) {
  if (p.splits == 1) return cudaSuccess;
  const size_t mn = static_cast<size_t>(p.M) * p.N;
  split_reduce_kernel<T><<<static_cast<unsigned>((mn + kReduceThreads - 1) / kReduceThreads), kReduceThreads, 0,
                           stream>>>(p);
  return cudaGetLastError();
}

// out = lowbit_linear(x, ...) for x of type T (f32 takes the SIMT path), given a plan_launch plan
// already written into p.splits / p.split_chunks. Errors: cudaErrorInvalidValue for an unknown `bits`.
template <class T>
cudaError_t launch_lowbit_a16(const Params& p, int bits, Path path, cudaStream_t stream) {
  const cudaError_t e = dispatch_bits<LowbitBits>(bits, [&](auto bits_c) -> cudaError_t {
    constexpr int BITS = decltype(bits_c)::value;
    if constexpr (std::is_same_v<T, float>) {
      const dim3 grid((p.N + kSimtThreads * kSimtCols - 1) / (kSimtThreads * kSimtCols),
                      (p.M + kSimtRows - 1) / kSimtRows, p.splits);
      lowbit_simt_kernel<BITS><<<grid, kSimtThreads, 0, stream>>>(p);
      return cudaGetLastError();
    } else {
      return path == Path::kSmallM ? launch_mma<SmallMConfig, BITS, T, false>(p, stream)
                                   : launch_mma<LargeMA16Config, BITS, T, false>(p, stream);
    }
  }, [] { return cudaErrorInvalidValue; });
  return e != cudaSuccess ? e : launch_split_reduce<T>(p, stream);
}

// out = w4a8_linear(...) with p.x = x_q, p.x_scale set and out of type T; bits in W4A8Bits. Errors:
// cudaErrorInvalidValue for an unknown `bits`.
template <class T>
cudaError_t launch_lowbit_a8(const Params& p, int bits, Path path, cudaStream_t stream) {
  const cudaError_t e = dispatch_bits<W4A8Bits>(bits, [&](auto bits_c) -> cudaError_t {
    constexpr int BITS = decltype(bits_c)::value;
    return path == Path::kSmallM ? launch_mma<SmallMConfig, BITS, T, true>(p, stream)
                                 : launch_mma<LargeMA8Config, BITS, T, true>(p, stream);
  }, [] { return cudaErrorInvalidValue; });
  return e != cudaSuccess ? e : launch_split_reduce<T>(p, stream);
}

}  // namespace qbert::cuda::lowbit
