// Unpacking low-bit weight codes on the CPU. Torch-free.
//
// The packed layout is stated once, in qbert/quant/packing.py (read its docstring); this header only
// names its constants and turns its index arithmetic into code. The fact the kernels build on: a word
// of a w-bit slice, shifted by w * i and masked with byte_mask(w), gives four consecutive codes
// 4i .. 4i+3 as four bytes. Across N (w_packed is [K_words, N], N contiguous) the same shift and mask
// apply to every column, so each unpacking loop below is a plain loop over columns that the compiler
// vectorizes for whatever ISA the calling function targets (the callers wrap these always-inline
// bodies in functions with __attribute__((target(...)))).
//
// A chunk of 32 codes never straddles two K groups: the ops require group_size to be a multiple of
// the chunk, or at least K (one group).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/constants.h"

namespace qbert::cpu::lowbit {

#define QBERT_ALWAYS_INLINE [[gnu::always_inline]] inline
// Targets of the wrappers around the plain-loop bodies. prefer-vector-width=512: without it GCC
// vectorizes plain loops with 256-bit registers even where AVX-512 is enabled.
#define QBERT_LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")))
#define QBERT_LOWBIT_AVX2 __attribute__((target("avx2,f16c")))

// The chunk geometry (kPackChunk, kBytesPerWord, kQuadsPerChunk) and byte_mask: common/constants.h.
constexpr int kByteBits = 8;
constexpr uint32_t kLowByte = 0xFF;
constexpr int kMaxSliceLog2 = 3;                          // the widest slice is 8 bits

// packing.slices: the powers of two in `bits`, widest first, taking the code's bits from the lowest up.
constexpr int slice_width(int bits, int s) {
  for (int p = kMaxSliceLog2; p >= 0; --p)
    if (bits & (1 << p)) {
      if (s == 0) return 1 << p;
      --s;
    }
  return 0;
}
constexpr int num_slices(int bits) { return __builtin_popcount(bits); }
// The slice's lowest code bit; slices are stored in order, width words each, so this is also the index
// of the slice's first word within the chunk.
constexpr int slice_offset(int bits, int s) {
  int offset = 0;
  for (int i = 0; i < s; ++i) offset += slice_width(bits, i);
  return offset;
}

inline int64_t chunks(int64_t K) { return (K + kPackChunk - 1) / kPackChunk; }

// Codes 4q .. 4q+3 (q < kQuadsPerChunk) of one column's chunk as the four bytes of a word, low byte
// first. `chunk` points at the column's word in the chunk's first row of w_packed; `ldw` = N.
// For 3 bits the 2-bit and 1-bit slices are OR-ed byte-wise (no byte exceeds 7: no carries).
// Word = a GCC vector of uint32_t does the same for as many consecutive columns at once (memcpy: an
// unaligned load of their words). An out-parameter, not a return value: GCC warns (-Wpsabi) about
// generic functions that return vectors wider than baseline x86-64's registers.
template <int BITS, class Word>
QBERT_ALWAYS_INLINE void load_four_codes(const int32_t* chunk, int64_t ldw, int q, Word& codes) {
  codes = Word{};
  for (int s = 0; s < num_slices(BITS); ++s) {
    const int width = slice_width(BITS, s), offset = slice_offset(BITS, s);
    const int quads_per_word = kQuadsPerChunk / width;  // a width-w word holds 32 / w codes
    Word word;
    std::memcpy(&word, chunk + (offset + q / quads_per_word) * ldw, sizeof word);
    codes |= ((word >> (width * (q % quads_per_word))) & byte_mask(width)) << offset;
  }
}

template <int BITS>
QBERT_ALWAYS_INLINE uint32_t four_codes(const int32_t* chunk, int64_t ldw, int q) {
  uint32_t codes;
  load_four_codes<BITS>(chunk, ldw, q, codes);
  return codes;
}

// Byte-wise (a + b) mod 256 in each byte of a word: no carry crosses into the next byte.
QBERT_ALWAYS_INLINE uint32_t add_bytes(uint32_t a, uint32_t b) {
  constexpr uint32_t kLow7 = 0x7F7F7F7Fu, kHigh = 0x80808080u;
  return ((a & kLow7) + (b & kLow7)) ^ ((a ^ b) & kHigh);
}

// One chunk of columns [0, nb) dequantized to float32: panel[k][n] = (u - zero[n]) * scale[n] for the
// chunk's 32 k (panel rows past K hold the padding codes; callers never read them). Integer u - zero
// converts exactly, so this is dequantize_lowbit's arithmetic to the bit.
template <int BITS>
QBERT_ALWAYS_INLINE void dequantize_chunk(const int32_t* chunk, int64_t ldw, int nb, const float* scale,
                                          const uint8_t* zero, float* panel, int ldp) {
  for (int q = 0; q < kQuadsPerChunk; ++q)
    for (int n = 0; n < nb; ++n) {
      const uint32_t codes = four_codes<BITS>(chunk + n, ldw, q);
#pragma GCC unroll 4
      for (int t = 0; t < kBytesPerWord; ++t)
        panel[(kBytesPerWord * q + t) * ldp + n] =
            static_cast<float>(static_cast<int>((codes >> (kByteBits * t)) & kLowByte) - zero[n]) * scale[n];
    }
}

// One chunk of columns [0, nb) as the u8 weight operand of the VNNI GEMM kernels (gemm_avx512.h,
// gemm_avx2.h): panel[q][n] holds the four bytes (u - zero) ^ 0x80 of codes 4q .. 4q+3 of column n,
// i.e. the int8 weight q = u - zero, wrapped to int8 as the reference's .to(torch.int8) does, then
// flipped to u8 by the kernels' sign trick. Columns [nb, ldp) are zeroed.
template <int BITS>
QBERT_ALWAYS_INLINE void vnni_chunk(const int32_t* chunk, int64_t ldw, int nb, const uint8_t* zero, uint32_t* panel,
                                    int ldp) {
  constexpr uint32_t kSignFlip = 0x80;
  for (int q = 0; q < kQuadsPerChunk; ++q) {
    for (int n = 0; n < nb; ++n) {
      const uint32_t flip_minus_zero = ((kSignFlip - zero[n]) & kLowByte) * kByteOnes;  // u + this = (u - z) ^ 0x80
      panel[q * ldp + n] = add_bytes(four_codes<BITS>(chunk + n, ldw, q), flip_minus_zero);
    }
    for (int n = nb; n < ldp; ++n) panel[q * ldp + n] = 0;
  }
}

}  // namespace qbert::cpu::lowbit
