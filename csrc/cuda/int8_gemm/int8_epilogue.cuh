// The int8 GEMM family's shared pieces: output kinds, GemmParams, the persistent tile order and the
// fused epilogue every kernel (int8_gemm_sm80.cuh, int8_gemm_sm90.cuh) ends each tile with. Torch-free.
// Specs: qbert/ops/int8_gemm.py (kI32), int8_linear.py (float outputs), int8_linear_requant.py (kS8).
//
//   acc[m, n] = sum_k a[m, k] * b[n, k]                                   exact int32
//   kI32:  out = acc
//   float: y = ((float(acc) * x_scale[m]) * w_scale[n]) + bias[n]        every op rounded on its own
//          (__fmul_rn / __fadd_rn: no FMA contraction, so y is bit-for-bit torch's f32 math);
//          kGelu: y = y * 0.5 * (1 + erf(y / sqrt(2)))                   torch's exact-erf GELU
//          out = y rounded to nearest even to f32 / f16 / bf16
//   kS8:   y as above, then per row over ALL N columns: s = max|y| / 127 (1 where that is 0, NaN for a
//          row holding a NaN or an infinity), q = clamp(rint(y / s), -127, 127) int8 (0 for a NaN s),
//          out_scale[m] = s        (quantize_per_token's rule, common/cuda_token_quant.cuh)
//
// kS8 needs a row's amax over every column tile before any of its tiles can be quantized. The n_tiles
// tiles of a row block are run by n_tiles CTAs in the same iteration of the persistent loop (see
// tile_coord); they exchange per-tile partial amaxes through global memory and a per-row-block arrival
// counter, so y never makes a round trip through HBM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "common/cuda_token_quant.cuh"

namespace qbert::cuda::int8 {

enum class OutKind : int { kI32, kF32, kF16, kBF16, kS8 };
enum class Act : int { kNone, kGelu };
// The bias is read in the layer's own dtype (a converted copy would cost a kernel launch per call, which
// at batch 1 is a visible share of a whole layer); each value is widened to f32 exactly.
enum class BiasKind : int { kNone, kF32, kF16, kBF16 };

struct GemmParams {
  const int8_t* a;          // [M, K] row-major; K % 16 == 0 and 16-byte aligned rows (the launcher pads otherwise)
  const int8_t* b;          // [N, K] row-major, same rule
  int M, N, K;
  const float* x_scale;     // [M]   float outputs and kS8; null for kI32
  const float* w_scale;     // [N]
  const void* bias;         // [N] of bias_kind, or null (bias_kind kNone)
  BiasKind bias_kind;
  void* out;                // [M, N] row-major (ld = N) of int32 / float / __half / __nv_bfloat16 / int8_t
  float* out_scale;         // kS8: [M]
  float* amax_partial;      // kS8 workspace: [M, n_tiles] per-(row, column tile) partial amax
  int* row_block_arrivals;  // kS8 workspace: [m_tiles], zeroed before each launch
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- persistent tile order -----------------------------------------------------------------------------

// Persistent, row-block-major tile order shared by every kernel: CTA c runs tiles c, c + gridDim.x, ...;
// tile t covers rows [(t / n_tiles) * BLOCK_M, +BLOCK_M) and cols [(t % n_tiles) * BLOCK_N, +BLOCK_N).
// For kS8 the host makes gridDim.x a multiple of n_tiles (and <= the co-resident CTA count), so the
// n_tiles CTAs of one row block always run the same iteration together (see epilogue_tile).
struct TileCoord {
  int m0, n0;  // the tile's first row and column
  int tile_n;  // its column-tile index in [0, n_tiles)
};

template <int BLOCK_M, int BLOCK_N>
__host__ __device__ constexpr TileCoord tile_coord(int tile, int n_tiles) {
  return {tile / n_tiles * BLOCK_M, tile % n_tiles * BLOCK_N, tile % n_tiles};
}

// Launches `grid` persistent CTAs of `kernel(p)`. kS8 launches are cooperative: the driver then starts
// the grid only when all its CTAs can be resident at once (else cudaErrorCooperativeLaunchTooLarge), even
// beside other kernels on other streams, which is what the row-block wait in epilogue_tile needs to
// always end. Other kinds need no such guarantee and launch normally. Both are capturable in CUDA graphs.
template <OutKind kOut>
cudaError_t launch_persistent(void (*kernel)(GemmParams), int grid, int threads, int smem_bytes, cudaStream_t stream,
                              const GemmParams& p) {
  // Above 48 KB of dynamic shared memory a kernel must opt in.
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes)) return e;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute cooperative[1];
  cooperative[0].id = cudaLaunchAttributeCooperative;
  cooperative[0].val.cooperative = 1;
  config.attrs = cooperative;
  config.numAttrs = kOut == OutKind::kS8 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p);
}

// ---- epilogue --------------------------------------------------------------------------------------------

// int32 elements per staged row; the pad of 4 shifts consecutive rows by 4 banks (fewer bank conflicts
// when a warp's accumulator fragments, 8 rows x 4 column pairs, are staged).
template <int BLOCK_N> inline constexpr int kEpiTileStride = BLOCK_N + 4;
template <int BLOCK_M, int BLOCK_N> inline constexpr int kEpiSmemBytes = BLOCK_M * kEpiTileStride<BLOCK_N> * 4;

template <OutKind> struct OutType;
template <> struct OutType<OutKind::kI32> { using T = int32_t; };
template <> struct OutType<OutKind::kF32> { using T = float; };
template <> struct OutType<OutKind::kF16> { using T = __half; };
template <> struct OutType<OutKind::kBF16> { using T = __nv_bfloat16; };
template <> struct OutType<OutKind::kS8> { using T = int8_t; };

namespace epi {

// Each thread handles kVec consecutive columns at a time: one 16-byte shared-memory read of staged
// int32 (or f32 y), one 16 / 8 / 4-byte global store of int32-f32 / f16-bf16 / int8.
constexpr int kVec = 4;
constexpr float kSqrtHalf = 0.70710678118654752440f;  // 1 / sqrt(2): GELU's erf(y / sqrt(2)) as torch writes it
// The kS8 wait: peers run the same persistent iteration, so they arrive within about one tile's time
// (microseconds). Each poll costs an L2 round trip plus the sleep (~0.1-0.3 us), so kMaxPolls of them
// (seconds) mean a peer can never come (not co-resident: the plan's contract broke): trap with an
// error instead of hanging the GPU.
constexpr unsigned kPollSleepNs = 64;
constexpr int kMaxPolls = 1 << 24;

// How a tile's threads cover it: kLanesPerRow consecutive lanes of one warp share a row (whole rows per
// warp, so row reductions are warp shuffles), each lane holding kChunksPerLane column chunks spaced
// kLanesPerRow chunks apart: consecutive lanes touch consecutive 16-byte pieces (coalesced stores,
// conflict-free shared reads). The block covers kRowsPerPass rows per pass.
template <int BLOCK_M, int BLOCK_N, int kThreads>
struct Layout {
  static constexpr int kChunksPerRow = BLOCK_N / kVec;
  static constexpr int kLanesPerRow = kChunksPerRow < kWarpSize ? kChunksPerRow : kWarpSize;
  static constexpr int kChunksPerLane = kChunksPerRow / kLanesPerRow;
  static constexpr int kRowsPerPass = kThreads / kLanesPerRow;
  static_assert(BLOCK_N % kVec == 0 && kChunksPerRow % kLanesPerRow == 0 && kWarpSize % kLanesPerRow == 0,
                "BLOCK_N / 4 must divide 32 or be a multiple of it");
  static_assert(kThreads % kWarpSize == 0 && BLOCK_M % kRowsPerPass == 0,
                "every pass is whole rows for every thread (the row shuffles need all lanes of a warp)");

  // Thread tid covers rows first_row(tid) + i * kRowsPerPass, columns col(lane_in_row(tid), j) + [0, kVec).
  __host__ __device__ static int first_row(int tid) { return tid / kLanesPerRow; }
  __host__ __device__ static int lane_in_row(int tid) { return tid % kLanesPerRow; }
  __host__ __device__ static int col(int lane_in_row, int j) { return (j * kLanesPerRow + lane_in_row) * kVec; }
};

// The max over the kLanes lanes of an aligned lane group (all lanes of the warp call it).
template <int kLanes>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float load_bias(const GemmParams& p, int col) {
  switch (p.bias_kind) {
    case BiasKind::kF32: return static_cast<const float*>(p.bias)[col];
    case BiasKind::kF16: return __half2float(static_cast<const __half*>(p.bias)[col]);
    case BiasKind::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.bias)[col]);
    case BiasKind::kNone: break;
  }
  return 0.f;
}

// y = ((float(acc) * xs) * ws) + bias, then GELU: each product and sum rounded on its own, in torch's order.
template <Act kAct>
__device__ __forceinline__ float dequant(int32_t acc, float xs, float ws, float bias, bool has_bias) {
  float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), xs), ws);
  if (has_bias) y = __fadd_rn(y, bias);
  if constexpr (kAct == Act::kGelu) {
    y = __fmul_rn(__fmul_rn(y, 0.5f), __fadd_rn(1.0f, erff(__fmul_rn(y, kSqrtHalf))));
  }
  return y;
}

// kVec outputs of type T as one aligned store.
template <class T>
struct alignas(kVec * sizeof(T)) Pack {
  T v[kVec];
};

// Stores v[0 .. kVec) at row `row`, columns col .. col+kVec-1 of out [M, N]: one vector store when the
// row is wide and aligned enough, else element by element up to column N.
template <class T>
__device__ __forceinline__ void store_vec(void* out, int N, int row, int col, bool vector_ok, const Pack<T>& v) {
  T* dst = static_cast<T*>(out) + static_cast<size_t>(row) * N + col;
  if (vector_ok && col + kVec <= N) {
    *reinterpret_cast<Pack<T>*>(dst) = v;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (col + i < N) dst[i] = v.v[i];
  }
}

__device__ __forceinline__ int load_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Arrive on this row block's counter and wait for its n_tiles tiles. CUTLASS's generic-barrier pattern:
// the barrier orders every thread's amax_partial stores before thread 0's fence + atomic (release); the
// acquire load + barrier orders the peers' stores before every thread's reads.
__device__ __forceinline__ void row_block_sync(int* counter, int n_tiles) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1);
    int polls = 0;
    while (load_acquire_gpu(counter) < n_tiles) {
      if (++polls == kMaxPolls) __trap();  // peers not co-resident: the plan broke its contract
      __nanosleep(kPollSleepNs);
    }
  }
  __syncthreads();
}

}  // namespace epi

// Every kernel ends each tile the same way: store its int32 accumulators for rows [m0, m0+BLOCK_M) x cols
// [n0, n0+BLOCK_N) into `tile` (shared memory, row-major, row stride kEpiTileStride<BLOCK_N>), then
// __syncthreads(), then ALL kThreads threads call epilogue_tile (it contains barriers; it ends with a
// __syncthreads() so the caller may reuse the shared memory afterwards). Rows >= M / cols >= N are
// computed but never stored. kS8: computes y in f32 in place in `tile`, writes this tile's per-row
// partial amax to amax_partial[row * n_tiles + tile_n], then arrives on row_block_arrivals[m0 / BLOCK_M]
// (threadfence + atomicAdd by one thread after a barrier) and waits (acquire load, __nanosleep, a bounded
// spin that __trap()s instead of hanging) until all n_tiles tiles of the row block arrived; then reads the
// row's n_tiles partials (ld.global.cg), forms s[m], writes q and (tile_n == 0 only) out_scale.
template <OutKind kOut, Act kAct, int BLOCK_M, int BLOCK_N, int kThreads>
__device__ void epilogue_tile(int32_t* tile, int m0, int n0, int tile_n, int n_tiles, const GemmParams& p) {
  static_assert(kOut != OutKind::kI32 || kAct == Act::kNone, "int8_gemm (kI32) has no activation");
  using L = epi::Layout<BLOCK_M, BLOCK_N, kThreads>;
  using T = typename OutType<kOut>::T;
  using epi::kVec;
  constexpr int kStride = kEpiTileStride<BLOCK_N>;
  const int lane_in_row = L::lane_in_row(threadIdx.x);
  const int row_in_pass = L::first_row(threadIdx.x);
  // Vector stores need rows that start kVec-element aligned (N % kVec == 0) and an aligned base.
  const bool vector_ok = p.N % kVec == 0 && reinterpret_cast<uintptr_t>(p.out) % sizeof(epi::Pack<T>) == 0;
  auto tile_col = [&](int j) { return L::col(lane_in_row, j); };  // within the tile

  if constexpr (kOut == OutKind::kI32) {
#pragma unroll 1
    for (int r = row_in_pass; r < BLOCK_M; r += L::kRowsPerPass) {
#pragma unroll
      for (int j = 0; j < L::kChunksPerLane; ++j) {
        const int4 v = *reinterpret_cast<const int4*>(tile + r * kStride + tile_col(j));
        if (m0 + r < p.M)
          epi::store_vec<int32_t>(p.out, p.N, m0 + r, n0 + tile_col(j), vector_ok, {{v.x, v.y, v.z, v.w}});
      }
    }
  } else {
    // A thread's columns are the same in every row: fetch their w_scale / bias once.
    const bool has_bias = p.bias_kind != BiasKind::kNone;
    float ws[L::kChunksPerLane][kVec], bias[L::kChunksPerLane][kVec];
#pragma unroll
    for (int j = 0; j < L::kChunksPerLane; ++j)
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int col = n0 + tile_col(j) + i;
        ws[j][i] = col < p.N ? p.w_scale[col] : 0.f;
        bias[j][i] = has_bias && col < p.N ? epi::load_bias(p, col) : 0.f;
      }

#pragma unroll 1
    for (int r = row_in_pass; r < BLOCK_M; r += L::kRowsPerPass) {
      const int row = m0 + r;
      const float xs = row < p.M ? p.x_scale[row] : 0.f;
      float amax = 0.f;  // kS8: this lane's max |y| over its valid columns of the row
#pragma unroll
      for (int j = 0; j < L::kChunksPerLane; ++j) {
        int4* src = reinterpret_cast<int4*>(tile + r * kStride + tile_col(j));
        const int4 acc = *src;
        const int32_t a[kVec] = {acc.x, acc.y, acc.z, acc.w};
        float y[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = epi::dequant<kAct>(a[i], xs, ws[j][i], bias[j][i], has_bias);
        if constexpr (kOut == OutKind::kS8) {
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            if (n0 + tile_col(j) + i < p.N) amax = fmaxf(amax, token::finite_abs(y[i]));
          *src = make_int4(__float_as_int(y[0]), __float_as_int(y[1]), __float_as_int(y[2]), __float_as_int(y[3]));
        } else if (row < p.M) {
          epi::Pack<T> out;
#pragma unroll
          for (int i = 0; i < kVec; ++i) out.v[i] = from_float<T>(y[i]);
          epi::store_vec<T>(p.out, p.N, row, n0 + tile_col(j), vector_ok, out);
        }
      }
      if constexpr (kOut == OutKind::kS8) {
        amax = epi::group_max<L::kLanesPerRow>(amax);
        if (lane_in_row == 0 && row < p.M) p.amax_partial[static_cast<size_t>(row) * n_tiles + tile_n] = amax;
      }
    }

    if constexpr (kOut == OutKind::kS8) {
      epi::row_block_sync(p.row_block_arrivals + m0 / BLOCK_M, n_tiles);
#pragma unroll 1
      for (int r = row_in_pass; r < BLOCK_M; r += L::kRowsPerPass) {
        const int row = m0 + r;
        // The row's partials were written by other CTAs: read them from L2 (.cg), never a stale L1 line.
        float amax = 0.f;
        if (row < p.M)
          for (int t = lane_in_row; t < n_tiles; t += L::kLanesPerRow)
            amax = fmaxf(amax, __ldcg(p.amax_partial + static_cast<size_t>(row) * n_tiles + t));
        amax = epi::group_max<L::kLanesPerRow>(amax);
        const float s = token::scale_of(amax);
        if (row >= p.M) continue;  // uniform over the row's lanes, and no shuffles below
        if (tile_n == 0 && lane_in_row == 0) p.out_scale[row] = s;
#pragma unroll
        for (int j = 0; j < L::kChunksPerLane; ++j) {
          const int4 v = *reinterpret_cast<const int4*>(tile + r * kStride + tile_col(j));
          const int32_t bits[kVec] = {v.x, v.y, v.z, v.w};
          epi::Pack<int8_t> q;
#pragma unroll
          for (int i = 0; i < kVec; ++i) q.v[i] = token::code_of(__int_as_float(bits[i]), s);
          epi::store_vec<int8_t>(p.out, p.N, row, n0 + tile_col(j), vector_ok, q);
        }
      }
    }
  }
  __syncthreads();  // the caller may overwrite `tile` next
}

}  // namespace qbert::cuda::int8
