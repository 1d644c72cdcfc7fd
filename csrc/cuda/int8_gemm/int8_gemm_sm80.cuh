// The int8 GEMM family's sm_80 kernels: mma.sync m16n8k32 s8 tensor-core MMAs fed by a multi-stage
// cp.async pipeline, one persistent kernel templated on its tile config. Torch-free. Runs on every
// cc 8.x and 9.0 device; on sm_90a the wgmma kernel (int8_gemm_sm90.cuh) takes the shapes that fill it.
//
//   acc[m, n] = sum_k a[m, k] * b[n, k]      a int8 [M, K], b int8 [N, K] (both K contiguous)
//
// mma.sync ...row.col... wants A as M x K row-major and B as K x N column-major, i.e. b's [N, K] rows
// as they are: both operands are copied to shared memory as K-contiguous rows and read with ldmatrix
// (8-bit data moved as b16 pairs, see ldmatrix_x4), no transposes anywhere.
//
// Each tile: a STAGES-deep pipeline of BLOCK_K slices (cp.async, zero-filled outside [M, N, K]), then
// the int32 accumulators are staged in shared memory and int8_epilogue.cuh's epilogue_tile finishes
// the tile (dequantize / GELU / requantize / store). Warps may also split BLOCK_K (WARPS_K > 1, the
// small-M config): their partial sums are added through shared memory before the epilogue (exact).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "cuda/int8_gemm/int8_epilogue.cuh"

namespace qbert::cuda::int8::sm80 {

inline constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;  // mma.sync.m16n8k32.s8
inline constexpr int kChunkBytes = kCpAsyncBytes;        // 16-byte chunks: one cp.async, one ldmatrix row
inline constexpr int kBankLineBytes = 128;               // 32 banks x 4 bytes: one shared-memory wavefront

// Four 8x8 b16 matrices (8 rows of 16 bytes each) from shared memory: lanes 8i .. 8i+7 give the row
// addresses of matrix i, and lane 4 * r + w receives word w (bytes 4w .. 4w+3) of row r of matrix i
// in r[i]. For int8 data that word is 4 consecutive k of one row: exactly an m16n8k32 A or B fragment
// register (cuda_mma.cuh: lane 4g + t holds row g, k 4t .. 4t+3).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// Shared-memory layout of a [rows, BLOCK_K] int8 stage tile: row-major, 16-byte chunks XOR-swizzled.
// Shared memory serves 8 16-byte bank groups per wavefront (a 128-byte line). An ldmatrix phase reads
// the same logical chunk of 8 consecutive rows; unswizzled, a row of 64 bytes (BLOCK_K = 64) puts rows
// r and r + 2 on the same group: a 4-way conflict. XOR-ing the chunk index with the row's position
// among the rows that share a column of groups (xor_of) spreads the 8 reads over all 8 groups
// (conflict-free) and keeps every chunk inside its own row. cp.async writes (8 consecutive chunks of a
// line per phase) stay conflict-free: the XOR only permutes chunks within a line.
template <int BLOCK_K>
struct Swizzle {
  static constexpr int kChunks = BLOCK_K / kChunkBytes;                               // chunks per row
  static constexpr int kGroups = kBankLineBytes / kChunkBytes;                        // 16-byte bank groups: 8
  static constexpr int kRowsPerLine = kChunks >= kGroups ? 1 : kGroups / kChunks;
  static constexpr int kPhases = kChunks >= kGroups ? kGroups : kChunks;              // XOR values in use
  static_assert(kChunks >= 1 && (kChunks & (kChunks - 1)) == 0, "BLOCK_K: a power of two >= 16");
  // Rows 8 apart get the same XOR, so offset(row + 8j, c) = offset(row, c) + 8j * BLOCK_K.
  static constexpr int kPeriodRows = kRowsPerLine * kPhases;
  static_assert(kPeriodRows == kGroups, "the XOR pattern repeats every 8 rows");

  __host__ __device__ static int xor_of(int row) { return (row / kRowsPerLine) % kPhases; }
  // Byte offset of (row, logical chunk) in the stage tile.
  __host__ __device__ static int offset(int row, int chunk) {
    return row * BLOCK_K + (chunk ^ xor_of(row)) * kChunkBytes;
  }
};

// One tile config; every config runs the same kernel. Warps are laid out WARPS_K (outermost) x WARPS_M
// x WARPS_N; each computes a (BLOCK_M / WARPS_M) x (BLOCK_N / WARPS_N) warp tile over its BLOCK_K /
// WARPS_K slice of every stage. kMinCtasPerSm goes to __launch_bounds__, so registers never hold
// occupancy below it (the plan counts on that many co-resident CTAs, see plan_int8_gemm).
template <int BLOCK_M_, int BLOCK_N_, int BLOCK_K_, int WARPS_M_, int WARPS_N_, int WARPS_K_, int STAGES_,
          int MIN_CTAS_PER_SM_>
struct TileConfig {
  static constexpr int BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, BLOCK_K = BLOCK_K_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, WARPS_K = WARPS_K_, STAGES = STAGES_;
  static constexpr int kMinCtasPerSm = MIN_CTAS_PER_SM_;
  static constexpr int kThreads = WARPS_M * WARPS_N * WARPS_K * kWarpSize;
  static constexpr int MT = BLOCK_M / WARPS_M / kMmaM;       // m16 tiles per warp
  static constexpr int NT = BLOCK_N / WARPS_N / kMmaN;       // n8 tiles per warp
  static constexpr int KSTEPS = BLOCK_K / WARPS_K / kMmaK;   // k32 steps per warp per stage
  static_assert(MT >= 1 && BLOCK_M == MT * kMmaM * WARPS_M, "BLOCK_M: whole m16 tiles per warp");
  static_assert(NT >= 2 && NT % 2 == 0 && BLOCK_N == NT * kMmaN * WARPS_N,
                "BLOCK_N: pairs of n8 tiles per warp (one ldmatrix.x4 loads two)");
  static_assert(KSTEPS >= 1 && BLOCK_K == KSTEPS * kMmaK * WARPS_K, "BLOCK_K: whole k32 steps per warp");
  static_assert(STAGES >= 2, "a pipeline");
  static_assert(kMmaM % Swizzle<BLOCK_K>::kPeriodRows == 0 && 2 * kMmaN % Swizzle<BLOCK_K>::kPeriodRows == 0,
                "ldmatrix bases move by whole swizzle periods");

  static constexpr int kAStageBytes = BLOCK_M * BLOCK_K;  // a [BLOCK_M, BLOCK_K] int8
  static constexpr int kBStageBytes = BLOCK_N * BLOCK_K;  // b [BLOCK_N, BLOCK_K] int8
  static constexpr int kStageBytes = kAStageBytes + kBStageBytes;
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kEpiBytes = WARPS_K * kEpiSmemBytes<BLOCK_M, BLOCK_N>;  // one staged tile per K slice
  // The epilogue reuses the pipeline's shared memory (the pipeline is drained by then).
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static_assert((BLOCK_M * BLOCK_N / epi::kVec) % kThreads == 0, "split-K reduction: whole int4 vectors per thread");
};

// Many tokens: 128 x 128 tiles, 8 warps of 64 x 32 (4 x 4 MMAs per k32 step from 4 + 2 ldmatrix.x4:
// each fragment feeds 4 MMAs). 4 stages of 64 K = 64 KB; the staged epilogue tile (67.6 KB) sets the
// size: 2 CTAs per SM on A100 (164 KB), so registers are capped at 128 to keep both.
using LargeConfig = TileConfig<128, 128, 64, 2, 4, 1, 4, 2>;
// Hundreds of tokens: 64 x 64 tiles, 4 warps of 32 x 32, four times as many tiles as LargeConfig so
// that mid-size GEMMs still reach every SM; 32 KB of pipeline, 4 CTAs per SM.
using MediumConfig = TileConfig<64, 64, 64, 2, 2, 1, 4, 4>;
// M = batch (pooler, classifier, M <= 32): 16-row blocks (one or two). The GEMM streams b, so the tile is
// narrow (64 columns: more CTAs along N) and its 4 warps split each 128-K stage (32 K each) instead of
// the columns; their partial sums meet in shared memory.
using SmallMConfig = TileConfig<16, 64, 128, 1, 1, 4, 4, 4>;

// Accumulator register i of lane `lane` in an m16n8 tile (cuda_mma.cuh): c[0..1] = (row g, cols 2t, 2t+1),
// c[2..3] = (row g+8, cols 2t, 2t+1), lane = 4g + t.
__host__ __device__ constexpr int acc_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
__host__ __device__ constexpr int acc_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }

// Where one warp works inside the CTA tile, and the shared-memory rows its lanes feed to ldmatrix.
// Host-callable: tests/cuda/int8_gemm_host_checks.cu replays these against the PTX fragment layouts.
template <class Cfg>
struct WarpTile {
  static constexpr int kChunksPerStep = kMmaK / kChunkBytes;  // 2 chunks of k per k32 step
  int wm0, wn0;  // the warp tile's first row and column inside the CTA tile
  int slice;     // the warp's K slice: k32 steps [slice * KSTEPS, (slice + 1) * KSTEPS) of every stage

  // Warps are numbered K slice (outermost), then row, then column.
  __host__ __device__ static WarpTile of(int warp) {
    const int warp_k = warp / (Cfg::WARPS_M * Cfg::WARPS_N);
    const int warp_m = warp % (Cfg::WARPS_M * Cfg::WARPS_N) / Cfg::WARPS_N;
    const int warp_n = warp % Cfg::WARPS_N;
    return {warp_m * Cfg::MT * kMmaM, warp_n * Cfg::NT * kMmaN, warp_k};
  }
  // The first chunk (of a stage row) of the warp's k32 step ks.
  __host__ __device__ int step_chunk(int ks) const { return (slice * Cfg::KSTEPS + ks) * kChunksPerStep; }

  // ldmatrix_x4 row addresses (byte offsets in a stage's A / B tile); lane l feeds row l % 8 of matrix l / 8.
  //   A, m16 tile mt: matrices {rows 0-7, rows 8-15} x {k 0-15, k 16-31} in the order a[0], a[1], a[2], a[3].
  //   B, n8 tiles 2np and 2np+1: matrices {n 0-7: k 0-15, k 16-31}, {n 8-15: k 0-15, k 16-31}
  //      = b[2np][0], b[2np][1], b[2np+1][0], b[2np+1][1].
  // Tiles move by 16 rows, a whole number of swizzle periods: the XOR of the base row still holds.
  __host__ __device__ int a_ldmatrix(int lane, int mt, int chunk) const {
    using S = Swizzle<Cfg::BLOCK_K>;
    return S::offset(wm0 + lane % 8 + 8 * (lane / 8 % 2), chunk + lane / 16) + mt * kMmaM * Cfg::BLOCK_K;
  }
  __host__ __device__ int b_ldmatrix(int lane, int np, int chunk) const {
    using S = Swizzle<Cfg::BLOCK_K>;
    return S::offset(wn0 + lane % 8 + 8 * (lane / 16), chunk + lane / 8 % 2) + np * 2 * kMmaN * Cfg::BLOCK_K;
  }
};

// The cp.async copies one thread issues to fill an operand's stage tile (rows [r0, r0 + ROWS) of x
// [rows, K] int8, one BLOCK_K slice): chunk c = tid % kChunks of rows tid / kChunks + i * kRowStep
// (consecutive threads copy consecutive chunks of a row: coalesced). The row pointers and range checks
// are worked out once per tile; each slice then only moves k0. Rows >= rows and chunks >= K are
// zero-filled (cp.async with src-size 0 reads nothing); K % 16 == 0, so a chunk is all in or all out.
template <int ROWS, int BLOCK_K, int kThreads>
struct TileLoader {
  using S = Swizzle<BLOCK_K>;
  static constexpr int kCopies = ROWS * S::kChunks / kThreads;
  static constexpr int kRowStep = kThreads / S::kChunks;  // rows between a thread's copies
  static_assert(kCopies >= 1 && kThreads % S::kChunks == 0, "every thread copies the same chunk of whole rows");

  const int8_t* src[kCopies];  // chunk c of each row at k = 0 (x itself for rows out of range)
  bool row_ok[kCopies];
  int chunk_k;                 // c * 16: the chunk's first k within a slice

  __device__ TileLoader(const int8_t* x, int rows, int K, int r0) {
    const int c = threadIdx.x % S::kChunks;
    chunk_k = c * kChunkBytes;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int r = r0 + threadIdx.x / S::kChunks + i * kRowStep;
      row_ok[i] = r < rows;
      src[i] = row_ok[i] ? x + static_cast<size_t>(r) * K + chunk_k : x;
    }
  }

  // Copies the slice starting at k0 into a stage tile.
  __device__ void load(unsigned char* dst, int k0, int K) const {
    const int c = threadIdx.x % S::kChunks;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const bool valid = row_ok[i] && k0 + chunk_k < K;
      cp_async_16(dst + S::offset(threadIdx.x / S::kChunks + i * kRowStep, c), valid ? src[i] + k0 : src[i], valid);
    }
  }
};

// The persistent kernel: CTA blockIdx.x runs tiles blockIdx.x, + gridDim.x, ... (tile_coord's order).
template <class Cfg, OutKind kOut, Act kAct>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinCtasPerSm) int8_gemm_mma_kernel(const GemmParams p) {
  constexpr int BLOCK_M = Cfg::BLOCK_M, BLOCK_N = Cfg::BLOCK_N, BLOCK_K = Cfg::BLOCK_K, STAGES = Cfg::STAGES;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, KSTEPS = Cfg::KSTEPS;
  constexpr int kStride = kEpiTileStride<BLOCK_N>;
  extern __shared__ __align__(kBankLineBytes) unsigned char smem[];

  const int lane = threadIdx.x % kWarpSize;
  const WarpTile<Cfg> wt = WarpTile<Cfg>::of(threadIdx.x / kWarpSize);
  const uint32_t smem_base = smem_address(smem);

  const int m_tiles = ceil_div(p.M, BLOCK_M), n_tiles = ceil_div(p.N, BLOCK_N);
  const int k_tiles = ceil_div(p.K, BLOCK_K);

#pragma unroll 1
  for (int tile = blockIdx.x; tile < m_tiles * n_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord<BLOCK_M, BLOCK_N>(tile, n_tiles);
    const TileLoader<BLOCK_M, BLOCK_K, Cfg::kThreads> a_loader(p.a, p.M, p.K, tc.m0);
    const TileLoader<BLOCK_N, BLOCK_K, Cfg::kThreads> b_loader(p.b, p.N, p.K, tc.n0);
    auto load_stage = [&](int stage, int kt) {
      unsigned char* base = smem + stage * Cfg::kStageBytes;
      a_loader.load(base, kt * BLOCK_K, p.K);
      b_loader.load(base + Cfg::kAStageBytes, kt * BLOCK_K, p.K);
    };
    int acc[MT][NT][4] = {};

    // Prologue: STAGES-1 slices in flight. Every thread commits one group per slice, empty or not, so
    // that the wait_group counts below line up.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }

#pragma unroll 1
    for (int kt = 0; kt < k_tiles; ++kt) {
      // Slice kt has landed once at most STAGES-2 younger groups are pending. The barrier makes every
      // thread's copies visible, and shows every warp is done with slice kt-1, whose stage the copy
      // issued next overwrites.
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const int ahead = kt + STAGES - 1;
      if (ahead < k_tiles) load_stage(ahead % STAGES, ahead);
      cp_async_commit();

      const uint32_t a_s = smem_base + kt % STAGES * Cfg::kStageBytes;
      const uint32_t b_s = a_s + Cfg::kAStageBytes;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int chunk = wt.step_chunk(ks);
        uint32_t af[MT][4], bf[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], a_s + wt.a_ldmatrix(lane, mt, chunk));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t r[4];
          ldmatrix_x4(r, b_s + wt.b_ldmatrix(lane, np, chunk));
          bf[2 * np][0] = r[0], bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_m16n8k32_s8(acc[mt][nt], af[mt], bf[nt]);
      }
    }
    // Only empty groups can be pending here; the barrier frees the pipeline's shared memory for staging.
    cp_async_wait<0>();
    __syncthreads();

    // Stage the accumulators, c[2h], c[2h+1] as one 8-byte store (adjacent columns); the warps of K
    // slice s write their own copy of the tile, slice s of the staging area.
    int32_t* tile_s = reinterpret_cast<int32_t*>(smem);
    int32_t* mine = tile_s + wt.slice * BLOCK_M * kStride;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = wt.wm0 + mt * kMmaM + acc_row(lane, 2 * h), col = wt.wn0 + nt * kMmaN + acc_col(lane, 2 * h);
          *reinterpret_cast<int2*>(mine + row * kStride + col) = make_int2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
    __syncthreads();
    if constexpr (Cfg::WARPS_K > 1) {
      // Add the K slices' tiles into slice 0's (integer sums: exact in any order).
      constexpr int kVecsPerRow = BLOCK_N / epi::kVec;
#pragma unroll
      for (int i = threadIdx.x; i < BLOCK_M * kVecsPerRow; i += Cfg::kThreads) {
        const int at = i / kVecsPerRow * kStride + i % kVecsPerRow * epi::kVec;
        int4 sum = *reinterpret_cast<const int4*>(tile_s + at);
#pragma unroll
        for (int s = 1; s < Cfg::WARPS_K; ++s) {
          const int4 v = *reinterpret_cast<const int4*>(tile_s + s * BLOCK_M * kStride + at);
          sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
        }
        *reinterpret_cast<int4*>(tile_s + at) = sum;
      }
      __syncthreads();
    }
    epilogue_tile<kOut, kAct, BLOCK_M, BLOCK_N, Cfg::kThreads>(tile_s, tc.m0, tc.n0, tc.tile_n, n_tiles, p);
  }
}

// Launches `grid` persistent CTAs of Cfg::kThreads threads with Cfg::kSmemBytes dynamic shared memory.
template <class Cfg, OutKind kOut, Act kAct>
cudaError_t launch(const GemmParams& p, int grid, cudaStream_t stream) {
  return launch_persistent<kOut>(int8_gemm_mma_kernel<Cfg, kOut, kAct>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
}

}  // namespace qbert::cuda::int8::sm80
