// The int8 GEMM family's Hopper kernel: acc[m, n] = sum_k a[m, k] * b[n, k] on the wgmma (IGMMA) tensor
// cores, then the shared epilogue (int8_epilogue.cuh). Torch-free; device code only for sm_90a (wgmma
// exists on no other target: elsewhere the kernel body is __trap() and is never launched).
//
// One CTA = 2 warpgroups (256 threads) computing a 128 x 256 output tile, persistent over the tiles in
// the family's row-block-major order (tile_coord). Per 128-deep K slice, every thread issues 16-byte
// cp.async copies of the A [128, 128] and B [256, 128] slices into a kStages-deep shared-memory ring,
// and each warpgroup issues 4 x wgmma.m64n256k32 (its 64 rows against all 256 columns, k 32 each) with
// both operands read from shared memory through matrix descriptors. No TMA and no warp specialization:
// every thread loads and every warpgroup multiplies, with two CTA barriers per K slice.
//
// Shared memory, per stage (48 KB, 1024-byte aligned):  A [kBlockM = 128 rows][128 bytes]   16 KB
//                                                       B [kBlockN = 256 rows][128 bytes]   32 KB
// Rows are K-contiguous ("K-major", the only order 8-bit wgmma reads) and 128-byte swizzled: 16-byte
// chunk c of row r is stored at chunk c ^ (r % 8). That is the hardware's 128B swizzle (address bits
// 4-6 XOR bits 7-9, relative to a 1024-byte aligned pattern), so wgmma reads what cp.async wrote, and
// the 8 rows of one 8 x 16-byte core matrix sit in 8 different bank quads (conflict-free reads).
//
// Registers: m64n256k32 gives each of a warpgroup's 128 threads 64 * 256 / 128 = 128 s32 accumulators,
// the m16n8 C layout repeated along N (PTX ISA "wgmma .m64nNk32 register fragment layout for D"; CuTe
// CLayout_64xN), with warp w of the warpgroup, g = lane / 4, t = lane % 4:
//   d[4j + 0/1] = (row 16w + g,     col 8j + 2t + 0/1)      j in [0, 32)
//   d[4j + 2/3] = (row 16w + g + 8, col 8j + 2t + 0/1)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "cuda/int8_gemm/int8_epilogue.cuh"

namespace qbert::cuda::int8::sm90 {

inline constexpr int kBlockM = 128;  // 2 warpgroups x wgmma's fixed M of 64
inline constexpr int kBlockN = 256;  // wgmma's widest N: each A slice feeds 256 columns per instruction
inline constexpr int kBlockK = 128;  // int8 = bytes: exactly one 128-byte swizzled row per operand row
inline constexpr int kThreads = 256;
// 4 stages of 48 KB: 3 K slices stay in flight while one is consumed. A slice is 128 x 256 x 128 MACs,
// ~1000 cycles of an H100 SM's int8 tensor cores (~4096 MAC / cycle), so ~3000 cycles (~1.6 us) of
// copies are in flight: more than HBM latency at 1 CTA per SM. A 5th stage would not fit in 227 KB.
inline constexpr int kStages = 4;

namespace detail {

constexpr int kWarpgroupThreads = 128;  // wgmma is issued by 4 consecutive warps together
constexpr int kWarpsPerWarpgroup = kWarpgroupThreads / kWarpSize;
constexpr int kWgmmaM = 64;             // rows per warpgroup per instruction (fixed by wgmma)
constexpr int kWgmmaK = 32;             // k per instruction for 8-bit operands = 32 bytes of a row
constexpr int kKSteps = kBlockK / kWgmmaK;                              // 4 instructions per K slice
constexpr int kAccRegs = kWgmmaM * kBlockN / kWarpgroupThreads;         // 128 s32 per thread
static_assert(kThreads == (kBlockM / kWgmmaM) * kWarpgroupThreads, "one warpgroup per 64 rows");
// The D fragment (see the top of the file) in named pieces.
constexpr int kDWarpRows = kWgmmaM / kWarpsPerWarpgroup;               // 16 rows of D per warp
constexpr int kDHalfRows = 8;            // d[4j + 2/3] lie 8 rows below d[4j + 0/1]
constexpr int kDColGroup = 8;            // columns of one register quad d[4j .. 4j + 3]
constexpr int kDLanesPerRow = 4;         // lanes t = lane % 4 share a row, 2 columns each per quad
static_assert(kBlockN == 256, "wgmma_m64n256k32 below is written for N = 256");

constexpr int kSwizzleBytes = 128;      // 128B swizzle: the row length it permutes within
constexpr int kSwizzleRows = 8;         // rows per swizzle pattern (chunk ^= row % 8)
constexpr int kSwizzleAtomBytes = kSwizzleRows * kSwizzleBytes;        // 1024: pattern period and alignment
static_assert(kBlockK == kSwizzleBytes, "one operand row is one swizzled 128-byte row");
constexpr int kChunksPerRow = kBlockK / kCpAsyncBytes;                  // 8 chunks of 16 bytes

constexpr int kATileBytes = kBlockM * kBlockK;                          // 16 KB
constexpr int kBTileBytes = kBlockN * kBlockK;                          // 32 KB
constexpr int kStageBytes = kATileBytes + kBTileBytes;                  // 48 KB
constexpr int kPipelineBytes = kStages * kStageBytes;                   // 192 KB
static_assert(kATileBytes % kSwizzleAtomBytes == 0 && kStageBytes % kSwizzleAtomBytes == 0,
              "every operand tile starts on a swizzle pattern boundary (descriptor base offset 0)");

// Copies: thread i copies chunk i % 8 of rows i / 8 + 32 j. A pass of 256 threads covers 32 whole rows,
// so each row is read as 128 contiguous bytes by 8 consecutive threads (coalesced), and since 32 is a
// multiple of 8 a thread's swizzled chunk is the same in every pass.
constexpr int kRowsPerPass = kThreads / kChunksPerRow;                  // 32
constexpr int kAPasses = kBlockM / kRowsPerPass;                        // 4 copies per thread
constexpr int kBPasses = kBlockN / kRowsPerPass;                        // 8 copies per thread
static_assert(kRowsPerPass % kSwizzleRows == 0 && kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0,
              "whole passes with a pass-invariant swizzle");

// Matrix descriptor (PTX ISA "Matrix Descriptor Format"; CuTe GmmaDescriptor): 14-bit fields hold byte
// values >> 4. For K-major 128B-swizzled operands (CuTe make_gmma_desc<Major::K>, LayoutType::B128):
//   bits  0-13  start address (shared window, & 0x3FFFF) >> 4
//   bits 16-29  leading byte offset: unused by swizzled K-major layouts, "assumed 1": CuTe writes 1
//   bits 32-45  stride byte offset: 1024 >> 4, from one 8-row core-matrix group to the next along M / N
//   bits 49-51  base offset: 0, every tile starts on a 1024-byte pattern boundary
//   bits 62-63  swizzle mode: 1 = 128B
// Stepping k by 32 inside the 128-byte row adds 32 bytes to the start address only: the hardware applies
// the swizzle to the full address, relative to the (unchanged) 1024-byte pattern (CuTe's
// DescriptorIterator advances the same way).
constexpr uint64_t kDescEncodeMask = 0x3FFFF;   // matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4
constexpr int kDescEncodeShift = 4;
constexpr uint64_t kDescLeadingField = 1;
constexpr uint64_t kDescStrideField = kSwizzleAtomBytes >> kDescEncodeShift;
constexpr uint64_t kDescSwizzle128B = 1;
constexpr int kDescLeadingBit = 16, kDescStrideBit = 32, kDescSwizzleBit = 62;
constexpr uint64_t kDescConstant = (kDescLeadingField << kDescLeadingBit) | (kDescStrideField << kDescStrideBit) |
                                   (kDescSwizzle128B << kDescSwizzleBit);

__device__ __forceinline__ uint64_t smem_descriptor(uint32_t smem_addr) {
  return ((smem_addr & kDescEncodeMask) >> kDescEncodeShift) | kDescConstant;
}

// Byte offset of chunk `chunk` of row `row` in a swizzled operand tile.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kSwizzleBytes + ((chunk ^ (row % kSwizzleRows)) * kCpAsyncBytes);
}

// Issues this thread's copies of one K slice: A rows [m0, m0 + 128) and B rows [n0, n0 + 256), columns
// [k0, k0 + 128), into one stage. Rows past M / N and chunks past K are zero-filled (K % 16 == 0, so a
// 16-byte chunk is either wholly inside K or wholly past it); zeros add nothing to the dot products.
__device__ __forceinline__ void load_stage(const GemmParams& p, unsigned char* stage, int m0, int n0, int k0) {
  const int row = threadIdx.x / kChunksPerRow;  // first row, in [0, 32)
  const int chunk = threadIdx.x % kChunksPerRow;
  const int k = k0 + chunk * kCpAsyncBytes;
  const bool k_ok = k < p.K;
  const size_t pass_bytes = static_cast<size_t>(kRowsPerPass) * p.K;  // global distance of consecutive passes
  const int8_t* a_src = p.a + static_cast<size_t>(m0 + row) * p.K + k;
  const int8_t* b_src = p.b + static_cast<size_t>(n0 + row) * p.K + k;
  unsigned char* const a_dst = stage + swizzled_offset(row, chunk);
  unsigned char* const b_dst = stage + kATileBytes + swizzled_offset(row, chunk);
#pragma unroll
  for (int j = 0; j < kAPasses; ++j) {
    const bool valid = k_ok && m0 + row + j * kRowsPerPass < p.M;
    cp_async_16(a_dst + j * kRowsPerPass * kSwizzleBytes, valid ? a_src + j * pass_bytes : p.a, valid);
  }
#pragma unroll
  for (int j = 0; j < kBPasses; ++j) {
    const bool valid = k_ok && n0 + row + j * kRowsPerPass < p.N;
    cp_async_16(b_dst + j * kRowsPerPass * kSwizzleBytes, valid ? b_src + j * pass_bytes : p.b, valid);
  }
}

// ---- wgmma and its fences (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate") ----------

// Orders this thread's earlier register accesses (accumulators) before the next wgmma's.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending committed wgmma groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// wgmma reads shared memory through the async proxy; cp.async wrote it through the generic proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// A compiler-only fence: the accumulators are "redefined" here, so no read of them can be hoisted above
// a wgmma_wait and no write sunk below a wgmma_fence (CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void fence_accumulators(int32_t (&d)[kAccRegs]) {
#pragma unroll
  for (int i = 0; i < kAccRegs; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// d (+)= A[64 x 32] * B[256 x 32]^T, s8 x s8 -> exact s32; `accumulate` false overwrites d (first k step).
__device__ __forceinline__ void wgmma_m64n256k32(int32_t (&d)[kAccRegs], uint64_t a_desc, uint64_t b_desc,
                                                 bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "
      "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "
      "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "
      "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "
      "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "
      "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(a_desc), "l"(b_desc), "r"(static_cast<int>(accumulate))
      : "memory");
}

}  // namespace detail

// The alignment the swizzled tiles need; the dynamic shared-memory base is rounded up to it at run time.
inline constexpr int kSmemAlign = detail::kSwizzleAtomBytes;
inline constexpr int kSmemBytes =
    (detail::kPipelineBytes > kEpiSmemBytes<kBlockM, kBlockN> ? detail::kPipelineBytes
                                                              : kEpiSmemBytes<kBlockM, kBlockN>) + kSmemAlign;
inline constexpr int kMaxSmemPerCta = 227 * 1024;  // sm_90's opt-in dynamic shared memory per block
static_assert(kSmemBytes <= kMaxSmemPerCta, "the pipeline does not fit in one SM's shared memory");

template <OutKind kOut, Act kAct>
__global__ void __launch_bounds__(kThreads, 1) int8_gemm_wgmma_kernel(GemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace detail;
  extern __shared__ __align__(16) unsigned char wgmma_smem_raw[];
  // Round the base up to the swizzle period (kSmemBytes reserves the slack): the hardware swizzles by
  // absolute address bits, so tiles must start on 1024-byte boundaries for chunk ^ (row % 8) to hold.
  unsigned char* const smem =
      wgmma_smem_raw + (kSmemAlign - smem_address(wgmma_smem_raw) % kSmemAlign) % kSmemAlign;
  const uint32_t smem_base = smem_address(smem);
  int32_t* const staged = reinterpret_cast<int32_t*>(smem);  // epilogue tile [kBlockM][kEpiTileStride], reuses the ring

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int warp_in_wg = threadIdx.x / kWarpSize % kWarpsPerWarpgroup;
  const int g = threadIdx.x % kWarpSize / kDLanesPerRow, t = threadIdx.x % kDLanesPerRow;  // D's lane coordinates

  const int m_tiles = ceil_div(p.M, kBlockM), n_tiles = ceil_div(p.N, kBlockN);
  // K = 0 still runs one all-zero slice, so the first (overwriting) wgmma leaves acc = 0.
  const int k_tiles = max(1, ceil_div(p.K, kBlockK));
  int32_t acc[kAccRegs];

#pragma unroll 1
  for (int tile = blockIdx.x; tile < m_tiles * n_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord<kBlockM, kBlockN>(tile, n_tiles);

    // Prologue: K slices 0 .. kStages-2 into stages 0 .. kStages-2, one commit group each (empty past
    // k_tiles, so that group s always holds slice s and the wait count below is the same every time).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(p, smem + s * kStageBytes, tc.m0, tc.n0, s * kBlockK);
      cp_async_commit();
    }

#pragma unroll 1
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int stage = kt % kStages;
      // Slice kt is commit group kt; kStages - 1 + kt groups are committed, so at most kStages - 2 may
      // still be pending. Then: this thread's copies -> async proxy (fence), every thread's -> every
      // warpgroup (barrier).
      cp_async_wait<kStages - 2>();
      fence_proxy_async_shared();
      __syncthreads();

      // This warpgroup's 64 A rows (an 8 KB, hence 1024-aligned, offset) and all 256 B rows.
      const uint32_t a_tile = smem_base + stage * kStageBytes + warpgroup * kWgmmaM * kBlockK;
      const uint32_t b_tile = smem_base + stage * kStageBytes + kATileBytes;
      fence_accumulators(acc);
      wgmma_fence();  // the previous tile's epilogue read acc; the wgmmas below write it
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        wgmma_m64n256k32(acc, smem_descriptor(a_tile + ks * kWgmmaK), smem_descriptor(b_tile + ks * kWgmmaK),
                         kt > 0 || ks > 0);
      }
      wgmma_commit();
      // Keep this slice's wgmmas running while the next copies are issued; wait only for the previous
      // slice's. After the barrier no warpgroup still reads stage (kt - 1) % kStages, which is exactly
      // the stage slice kt + kStages - 1 is copied into (wgmma completion includes an implicit
      // async -> generic proxy fence, so the generic-proxy overwrite needs no further fence).
      wgmma_wait<1>();
      fence_accumulators(acc);
      __syncthreads();
      const int next = kt + kStages - 1;
      if (next < k_tiles) load_stage(p, smem + next % kStages * kStageBytes, tc.m0, tc.n0, next * kBlockK);
      cp_async_commit();  // possibly empty: keeps "group kt = slice kt"
    }
    // Every copy of this tile has been waited for (the groups still pending are empty). Wait for the last
    // slice's wgmmas; the barrier then guarantees that no warpgroup reads the ring any more, so it can
    // be overwritten with the staged accumulators.
    wgmma_wait<0>();
    fence_accumulators(acc);
    __syncthreads();

    // Each thread's register quad j holds columns 8j + 2t + {0, 1} of rows row0 and row0 + 8: two 8-byte
    // stores (the staged row stride, 260 int32, keeps them 8-byte aligned).
    constexpr int kStride = kEpiTileStride<kBlockN>;
    static_assert(kStride % 2 == 0, "8-byte aligned int2 stores");
    const int row0 = warpgroup * kWgmmaM + warp_in_wg * kDWarpRows + g;
#pragma unroll
    for (int j = 0; j < kBlockN / kDColGroup; ++j) {
      const int col = kDColGroup * j + 2 * t;
      int32_t* const dst = staged + row0 * kStride + col;
      *reinterpret_cast<int2*>(dst) = make_int2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<int2*>(dst + kDHalfRows * kStride) = make_int2(acc[4 * j + 2], acc[4 * j + 3]);
    }
    __syncthreads();
    // Ends with a barrier: the next tile's prologue may overwrite the staged tile.
    epilogue_tile<kOut, kAct, kBlockM, kBlockN, kThreads>(staged, tc.m0, tc.n0, tc.tile_n, n_tiles, p);
  }
#else
  __trap();  // wgmma needs sm_90a; the dispatch never launches this kernel elsewhere
#endif
}

// Launches `grid` persistent CTAs of kThreads threads with kSmemBytes dynamic shared memory.
template <OutKind kOut, Act kAct>
cudaError_t launch(const GemmParams& p, int grid, cudaStream_t stream) {
  return launch_persistent<kOut>(int8_gemm_wgmma_kernel<kOut, kAct>, grid, kThreads, kSmemBytes, stream, p);
}

}  // namespace qbert::cuda::int8::sm90
