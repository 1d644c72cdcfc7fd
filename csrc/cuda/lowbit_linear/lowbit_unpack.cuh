// Register-level unpacking of the packed low-bit layout. qbert/quant/packing.py is the single statement
// of that layout (its constants and byte_mask: common/constants.h); this file only reads it. In short: K
// is cut into chunks of kPackChunk = 32 codes, a chunk of b-bit codes is b int32 words (w_packed is
// [chunks * b, N], N contiguous), the b bits of a code are split into power-of-two slices (8 -> [8],
// 4 -> [4], 3 -> [2, 1], 2 -> [2]) and inside a slice word of width w, `(word >> (w * i)) & byte_mask(w)`
// yields codes 4i .. 4i+3 of the word as four bytes. Four consecutive K codes in one register is the
// operand shape of the int8 tensor cores, and two byte_perm's turn it into two f16x2 / bf16x2 pairs.
#pragma once

#include "common/constants.h"
#include "common/cuda_mma.cuh"

namespace qbert::cuda::lowbit {

// The widest power of two in `bits`: the first slice (packing.slices).
__host__ __device__ constexpr int widest_slice(int bits) { return bits >= 8 ? 8 : bits >= 4 ? 4 : bits >= 2 ? 2 : 1; }

template <int BITS>
struct Slices {
  static_assert(LowbitBits::contains(BITS), "bits must be one of LowbitBits (common/constants.h)");
  static constexpr int kWide = widest_slice(BITS);  // code bits 0 .. kWide-1, in words 0 .. kWide-1
  static constexpr int kNarrow = BITS - kWide;      // 1 for 3-bit codes (code bit 2, in word kWide), else 0
};

// Codes 4*quad .. 4*quad+3 of one slice, as four bytes. Slice words of width W hold 32 / W codes, i.e.
// kQuadsPerChunk / W quads each; `word(i)` returns the chunk's i-th word.
template <int W, class WordFn>
__device__ __forceinline__ uint32_t slice_quad(int first_word, int quad, WordFn&& word) {
  constexpr int kQuadsPerWord = kQuadsPerChunk / W;
  return (word(first_word + quad / kQuadsPerWord) >> (W * (quad % kQuadsPerWord))) & byte_mask(W);
}

// Codes 4*quad .. 4*quad+3 of a chunk (0 <= quad < 8) as four bytes, each an unsigned code < 2^BITS.
template <int BITS, class WordFn>
__device__ __forceinline__ uint32_t chunk_quad(int quad, WordFn&& word) {
  using S = Slices<BITS>;
  uint32_t bytes = slice_quad<S::kWide>(0, quad, word);
  if constexpr (S::kNarrow > 0) bytes |= slice_quad<S::kNarrow>(S::kWide, quad, word) << S::kWide;
  return bytes;
}

// ---- codes -> signed int8 (the W4A8 B operand) ---------------------------------------------------------

// Bytes (u - z) for four codes u and the zero point repeated in each byte (z * kByteOnes). Setting
// each byte's top bit first keeps every byte of the subtraction >= 0 (u, z < 128), so no borrow crosses
// a byte; flipping the top bit back gives the two's complement of u - z.
constexpr uint32_t kByteTopBits = 0x80808080u;
__device__ __forceinline__ uint32_t signed_quad(uint32_t codes, uint32_t zero_bytes) {
  return ((codes | kByteTopBits) - zero_bytes) ^ kByteTopBits;
}

// ---- codes -> f16x2 / bf16x2 pairs (the W*A16 B operand) --------------------------------------------

// "Magic number" conversion: a code placed in the low mantissa byte of 2^p (the exponent in the high
// byte) is the float 2^p + u, exact while u < 2^(mantissa bits). Subtracting 2^p + z (the "zero word")
// then gives u - z exactly, as an integer-valued T. f16: 2^10 = 1024 with 10 mantissa bits (any code);
// bf16: 2^7 = 128 with 7 mantissa bits (codes < 128, i.e. up to 4 bits); 8-bit codes into bf16 go
// through f32 (2^23 with 23 mantissa bits) and a rounding-free f32 -> bf16 conversion (|u - z| < 256
// has at most 8 significant bits).
constexpr uint32_t kHalfMagic = 0x6400u;      // 1024.0 in f16
constexpr uint32_t kBf16Magic = 0x4300u;      // 128.0 in bf16
constexpr uint32_t kF32Magic = 0x4B000000u;   // 8388608.0 = 2^23 in f32
constexpr int kHalfMantissaBits = 10;
constexpr int kBf16MantissaBits = 7;
constexpr uint32_t kPairLanes = 0x00010001u;  // x * kPairLanes repeats a 16-bit value in both halves

// __byte_perm selectors. (lo code, hi code) of pair p as T bits [code, exponent byte]: bytes
// (2p, 4, 2p+1, 4) of {x = codes, y = exponent byte}. And code i as f32 bits [code, 0, 0, 0x4B]: bytes
// (i, 4, 4, 7) of {x = codes, y = kF32Magic}.
__host__ __device__ constexpr uint32_t pair_selector(int p) { return 0x4040u | (2 * p) | (2 * p + 1) << 8; }
constexpr uint32_t kF32Selector = 0x7440u;  // | i

template <class T, int BITS>
struct Dequant16 {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16");
  static constexpr bool kIsHalf = std::is_same_v<T, __half>;
  static constexpr uint32_t kMagic = kIsHalf ? kHalfMagic : kBf16Magic;
  static constexpr bool kVia16 = BITS <= (kIsHalf ? kHalfMantissaBits : kBf16MantissaBits);
  using T2 = std::conditional_t<kIsHalf, __half2, __nv_bfloat162>;

  // What pairs() subtracts, for zero point z: T2(2^p + z, 2^p + z), or f32 2^23 + z.
  __device__ __forceinline__ static uint32_t zero_word(uint32_t z) {
    return kVia16 ? (kMagic | z) * kPairLanes : (kF32Magic | z);
  }

  // Four codes as two T2 registers: (u0 - z, u1 - z), (u2 - z, u3 - z).
  __device__ __forceinline__ static void pairs(uint32_t codes, uint32_t zero, uint32_t (&out)[2]) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if constexpr (kVia16) {
        uint32_t biased = __byte_perm(codes, kMagic >> 8, pair_selector(p));
        T2 v = __hsub2(*reinterpret_cast<T2*>(&biased), *reinterpret_cast<T2*>(&zero));
        out[p] = *reinterpret_cast<uint32_t*>(&v);
      } else {
        const float lo = __int_as_float(__byte_perm(codes, kF32Magic, kF32Selector | (2 * p))) - __int_as_float(zero);
        const float hi = __int_as_float(__byte_perm(codes, kF32Magic, kF32Selector | (2 * p + 1))) - __int_as_float(zero);
        T2 v = __floats2bfloat162_rn(lo, hi);
        out[p] = *reinterpret_cast<uint32_t*>(&v);
      }
    }
  }
};

// Code i (0 <= i < 4) of a quad minus the zero point, as an exact f32 (SIMT path): `zero` is
// __int_as_float(kF32Magic | z).
__device__ __forceinline__ float code_minus_zero(uint32_t codes, int i, float zero) {
  return __int_as_float(__byte_perm(codes, kF32Magic, kF32Selector | i)) - zero;
}

}  // namespace qbert::cuda::lowbit
