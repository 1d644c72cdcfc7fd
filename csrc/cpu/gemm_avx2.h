// 256-bit int8 GEMM kernels: AVX-VNNI (vpdpbusd on ymm) and plain AVX2 (vpmaddwd). Torch-free.
// Both keep a kMr x kNr = 6 x 16 int32 tile in 12 ymm accumulators (+ 2 B vectors + 1 broadcast A:
// 15 of the 16 ymm registers) over B packed per call, one 16-column panel at a time.
//
// AVX-VNNI: the same u8 x s8 sign trick as gemm_avx512.h (b flipped to u8 while packing, the
// epilogue subtracts 128 * rowsum(a)); panel layout [K/4][16][4] u8.
//
// AVX2: vpmaddubsw would add two u8 x s8 products into a saturating int16 (255 * 128 * 2 > 32767),
// so instead both operands are sign-extended to int16 and vpmaddwd adds two int16 x int16 products
// into an int32 lane, which cannot saturate (|a b| <= 128 * 128, two of them < 2^31). Signed x signed
// needs no correction. Panel layout [K/2][16][2] int16; A is widened once per call to int16 rows.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qbert::cpu::avx2 {

constexpr int kMr = 6;
constexpr int kNr = 16;
constexpr int kLanes = 8;                    // int32 lanes per ymm
constexpr int kVecsPerPanel = kNr / kLanes;  // 2
constexpr int kVnniGroup = 4;                // k per int32 lane of vpdpbusd
constexpr int kMaddGroup = 2;                // k per int32 lane of vpmaddwd
constexpr uint8_t kSignFlip = 0x80;
constexpr int kCorrShift = 7;                // 128 * rowsum

#define QBERT_AVXVNNI __attribute__((target("avx2,f16c,avxvnni")))
#define QBERT_AVX2 __attribute__((target("avx2,f16c")))

inline int64_t groups(int64_t K, int group) { return (K + group - 1) / group; }

// ---- AVX-VNNI --------------------------------------------------------------------------------------
inline int64_t vnni_panel_bytes(int64_t K) { return groups(K, kVnniGroup) * kNr * kVnniGroup; }

// Columns [n0, n0 + nr) of b [N, K] -> dst [K/4][16][4] u8 (b ^ 0x80); padding (n >= nr, k >= K) is 0.
// Whole k-groups move as one 32-bit word each (the xor flips all four bytes at once); only the last,
// partial group goes byte by byte.
inline void vnni_pack_b_panel(const int8_t* b, int64_t K, int64_t n0, int nr, uint8_t* dst) {
  constexpr uint32_t kFlip4 = 0x80808080u;  // kSignFlip in each byte of a word
  std::memset(dst, 0, vnni_panel_bytes(K));
  const int64_t full = K / kVnniGroup;
  for (int64_t g = 0; g < full; ++g)
    for (int j = 0; j < nr; ++j) {
      uint32_t w;
      std::memcpy(&w, b + (n0 + j) * K + g * kVnniGroup, sizeof(w));
      w ^= kFlip4;
      std::memcpy(dst + (g * kNr + j) * kVnniGroup, &w, sizeof(w));
    }
  for (int j = 0; j < nr; ++j)
    for (int64_t k = full * kVnniGroup; k < K; ++k)
      dst[(full * kNr + j) * kVnniGroup + k % kVnniGroup] = static_cast<uint8_t>(b[(n0 + j) * K + k]) ^ kSignFlip;
}

template <int MR>
QBERT_AVXVNNI inline void vnni_micro_kernel(const int8_t* a, int64_t lda, const uint8_t* bp, int64_t ng,
                                            int32_t* tile) {
  __m256i acc[MR][kVecsPerPanel];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecsPerPanel; ++v) acc[r][v] = _mm256_setzero_si256();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp) + 1);
    bp += kNr * kVnniGroup;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + g * kVnniGroup, sizeof(a4));
      const __m256i av = _mm256_set1_epi32(a4);
      acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], b0, av);
      acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], b1, av);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecsPerPanel; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr + v * kLanes), acc[r][v]);
}

QBERT_AVXVNNI inline void vnni_micro_kernel_rows(int mr, const int8_t* a, int64_t lda, const uint8_t* bp,
                                                 int64_t ng, int32_t* tile) {
  switch (mr) {
    case 1: return vnni_micro_kernel<1>(a, lda, bp, ng, tile);
    case 2: return vnni_micro_kernel<2>(a, lda, bp, ng, tile);
    case 3: return vnni_micro_kernel<3>(a, lda, bp, ng, tile);
    case 4: return vnni_micro_kernel<4>(a, lda, bp, ng, tile);
    case 5: return vnni_micro_kernel<5>(a, lda, bp, ng, tile);
    default: return vnni_micro_kernel<kMr>(a, lda, bp, ng, tile);
  }
}

// 128 * sum_k a[k], wrapping as the accumulators do.
QBERT_AVXVNNI inline int32_t vnni_row_corr(const int8_t* a, int64_t K) {
  uint32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += static_cast<uint32_t>(static_cast<int32_t>(a[k]));
  return static_cast<int32_t>(sum << kCorrShift);
}

// ---- AVX2 (vpmaddwd) -------------------------------------------------------------------------------
inline int64_t madd_panel_elems(int64_t K) { return groups(K, kMaddGroup) * kNr * kMaddGroup; }
inline int64_t madd_a_ld(int64_t K) { return groups(K, kMaddGroup) * kMaddGroup; }  // K rounded up to even

// Columns [n0, n0 + nr) of b [N, K] -> dst [K/2][16][2] int16; padding is 0.
QBERT_AVX2 inline void madd_pack_b_panel(const int8_t* b, int64_t K, int64_t n0, int nr, int16_t* dst) {
  std::memset(dst, 0, madd_panel_elems(K) * sizeof(int16_t));
  const int64_t full = K / kMaddGroup;
  for (int64_t g = 0; g < full; ++g)
    for (int j = 0; j < nr; ++j) {
      const int8_t* src = b + (n0 + j) * K + g * kMaddGroup;
      int16_t* out = dst + (g * kNr + j) * kMaddGroup;
      out[0] = src[0];
      out[1] = src[1];
    }
  if (K % kMaddGroup)
    for (int j = 0; j < nr; ++j) dst[(full * kNr + j) * kMaddGroup] = b[(n0 + j) * K + K - 1];
}

// One row of A widened to int16, zero-padded to madd_a_ld(K).
QBERT_AVX2 inline void madd_widen_a_row(const int8_t* a, int64_t K, int16_t* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = a[k];
  for (int64_t k = K; k < madd_a_ld(K); ++k) dst[k] = 0;
}

template <int MR>
QBERT_AVX2 inline void madd_micro_kernel(const int16_t* a, int64_t lda, const int16_t* bp, int64_t ng,
                                         int32_t* tile) {
  __m256i acc[MR][kVecsPerPanel];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecsPerPanel; ++v) acc[r][v] = _mm256_setzero_si256();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp) + 1);
    bp += kNr * kMaddGroup;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a2;  // a[m, 2g], a[m, 2g + 1] as two int16
      std::memcpy(&a2, a + r * lda + g * kMaddGroup, sizeof(a2));
      const __m256i av = _mm256_set1_epi32(a2);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(b0, av));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(b1, av));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecsPerPanel; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNr + v * kLanes), acc[r][v]);
}

QBERT_AVX2 inline void madd_micro_kernel_rows(int mr, const int16_t* a, int64_t lda, const int16_t* bp, int64_t ng,
                                              int32_t* tile) {
  switch (mr) {
    case 1: return madd_micro_kernel<1>(a, lda, bp, ng, tile);
    case 2: return madd_micro_kernel<2>(a, lda, bp, ng, tile);
    case 3: return madd_micro_kernel<3>(a, lda, bp, ng, tile);
    case 4: return madd_micro_kernel<4>(a, lda, bp, ng, tile);
    case 5: return madd_micro_kernel<5>(a, lda, bp, ng, tile);
    default: return madd_micro_kernel<kMr>(a, lda, bp, ng, tile);
  }
}

}  // namespace qbert::cpu::avx2
