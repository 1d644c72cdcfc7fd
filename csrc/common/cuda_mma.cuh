// Thin wrappers over the sm_80 PTX that the tensor-core kernels share: cp.async (global -> shared
// copies that bypass the registers, so a multi-stage pipeline can keep several tiles in flight) and
// mma.sync (warp-wide tensor-core MMAs). Torch-free. sm_90a runs the same instructions (Hopper keeps
// mma.sync and cp.async; its wgmma / TMA road is a separate, later path).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k32"), with lane = 4 * g + t
// (g = groupID in [0, 8), t = threadID_in_group in [0, 4)):
//   m16n8k16 f16/bf16  A 16x16: a[0] = (row g,   k 2t..2t+1)   a[1] = (row g+8, k 2t..2t+1)
//                               a[2] = (row g,   k 2t+8..2t+9) a[3] = (row g+8, k 2t+8..2t+9)
//                      B 16x8:  b[0] = (k 2t..2t+1, col g)     b[1] = (k 2t+8..2t+9, col g)
//   m16n8k32 s8        A 16x32: a[0] = (row g,   k 4t..4t+3)   a[1] = (row g+8, k 4t..4t+3)
//                               a[2] = (row g,   k 4t+16..+19) a[3] = (row g+8, k 4t+16..+19)
//                      B 32x8:  b[0] = (k 4t..4t+3, col g)     b[1] = (k 4t+16..4t+19, col g)
//   C/D 16x8 (f32 or s32):      c[0..1] = (row g, cols 2t, 2t+1)   c[2..3] = (row g+8, cols 2t, 2t+1)
// A thread's A and B fragments cover the same k indices, so a kernel may renumber k (the same
// permutation for A and B) without changing the product; the low-bit kernels use that to give each
// thread consecutive k values (see lowbit_linear_kernel.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace qbert::cuda {

constexpr int kWarpSize = 32;
constexpr int kCpAsyncBytes = 16;  // the widest cp.async copy; needs 16-byte aligned source and target

// ---- cp.async ----------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes when !valid (src-size 0: nothing is read, so `src` only has
// to be some mapped address). .cg caches in L2 only: streamed tiles are used once per CTA.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? kCpAsyncBytes : 0));
}

// 4-byte variant for rows that are not 16-byte aligned (e.g. w_packed rows when N % 4 != 0).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight (this thread's copies only:
// a __syncthreads() must follow before other threads' data is read).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- mma.sync ----------------------------------------------------------------------------------------

// D = A * B + D, m16n8k16, f16 or bf16 operands, f32 accumulators (layouts above).
template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 operands");
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// D = A * B + D, m16n8k32, s8 operands, exact s32 accumulators (no saturation: the callers bound K).
__device__ __forceinline__ void mma_m16n8k32_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- conversions -------------------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// Round to nearest even, as torch's .to(dtype).
template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

}  // namespace qbert::cuda
