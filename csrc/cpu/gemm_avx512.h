// AVX512-VNNI int8 GEMM kernels: c[m, n] = sum_k a[m, k] * b[n, k], exact in int32. Torch-free.
//
// Sign trick. vpdpbusd multiplies u8 by s8, and int8 x int8 is s8 x s8. The weight side b is flipped
// to u8 (b ^ 0x80 == b + 128) while it is packed, which costs nothing extra, so
//     sum_k (b + 128) * a = c + 128 * rowsum(a[m])
// and the epilogue subtracts corr[m] = 128 * rowsum(a[m]): O(M K) work, not O(N K). The int32 sums
// may wrap on the way (K * 255 * 128 can pass 2^31) but vpdpbusd wraps, and so does the correction,
// so the result is exact modulo 2^32, hence exact: the true c fits in int32 for K <= 131071.
//
// Packed path (M >= kSmallM). B is packed per call, one panel of kNr = 48 columns at a time, as
// [K/4][48][4] u8: one 64-byte load gives 16 columns x 4 k, the operand of one vpdpbusd. The
// micro-kernel keeps a kMr x 48 int32 tile in 8 x 3 = 24 zmm accumulators and, per 4 k, does 3 loads
// of B, 8 broadcasts of 4 bytes of A (row-major A, no packing) and 24 vpdpbusd. A panel holds
// 192 * K/4 bytes (36 KiB at K = 768), reused by all M / kMr tiles; A streams from L2. When the tile
// is done the epilogue runs on the accumulators in registers (store_tile).
//
// Dot path (M < kSmallM). Packing B costs O(N K), as much as the product itself when M is tiny, so
// here A and B are used row-major: each zmm holds 64 consecutive k of one row, a (a rows x b rows)
// block of accumulators is reduced horizontally at the end.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/gemm_epilogue.h"

namespace qbert::cpu::avx512 {

// 8 x 48: 8 x 3 = 24 zmm accumulators + 3 B + 1 A of the 32 registers. A 48-column panel at K = 768
// (36 KiB) and the 8 rows of A it meets (6 KiB) fit together in a 48 KiB L1, and BERT's M (128 per
// sequence) is a multiple of 8, so no tile runs half empty.
constexpr int kMr = 8;                       // rows of A per micro-tile
constexpr int kNr = 48;                      // columns per panel: 3 zmm of 16 int32 lanes
constexpr int kLanes = 16;                   // int32 lanes per zmm
constexpr int kVecsPerPanel = kNr / kLanes;  // 4
constexpr int kKGroup = 4;                   // k per int32 lane of vpdpbusd
constexpr int kBytesPerVec = 64;
constexpr int kGroupsPerVec = kBytesPerVec / kKGroup;  // 16 k-groups in one 64-byte row chunk
constexpr uint8_t kSignFlip = 0x80;                    // s8 ^ 0x80 == u8 (s8 + 128)
constexpr int kCorrShift = 7;                          // corr = rowsum << 7 == 128 * rowsum

#define QBERT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

inline int64_t k_groups(int64_t K) { return (K + kKGroup - 1) / kKGroup; }
inline int64_t panel_bytes(int64_t K) { return k_groups(K) * kNr * kKGroup; }

QBERT_AVX512 inline __mmask64 byte_mask(int64_t n) {
  return n >= kBytesPerVec ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
}

// 16 x 16 transpose of int32: in row i = 16 k-groups of column i; out row t = k-group t of 16 columns.
// Stages: 32-bit and 64-bit unpacks transpose each 4 x 4 block inside 128-bit lanes, then two rounds
// of 128-bit lane shuffles move the blocks (kEvenLanes takes lanes 0, 2 of each source, kOddLanes 1, 3).
constexpr int kEvenLanes = 0x88;
constexpr int kOddLanes = 0xdd;
QBERT_AVX512 inline void transpose16x16(__m512i r[kLanes]) {
  __m512i t[kLanes];
  for (int i = 0; i < kLanes; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < kLanes; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + j], 128-bit lane L: k-group 4L + j of columns 4q .. 4q + 3.
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], kEvenLanes);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], kOddLanes);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], kEvenLanes);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], kOddLanes);
  }
}

// Packs columns [n0, n0 + nr) of b [N, K] (nr <= NR) into dst [k_groups(K)][NR][4], flipped to u8 (FLIP)
// or kept s8. Columns past nr and k past K are zero (u8 zero when flipped), so they add nothing whatever
// the other operand holds there. NR = kNr, FLIP: the VNNI panel; NR = 16, unflipped: one AMX tile column
// of activations (gemm_amx.h).
template <int NR = kNr, bool FLIP = true>
QBERT_AVX512 inline void pack_b_panel(const int8_t* b, int64_t K, int64_t n0, int nr, uint8_t* dst) {
  static_assert(NR % kLanes == 0, "a panel is whole vectors of 16 columns");
  constexpr int kVecs = NR / kLanes;
  const int64_t groups = k_groups(K);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(FLIP ? kSignFlip : 0));
  for (int64_t k0 = 0; k0 < K; k0 += kBytesPerVec) {
    const __mmask64 km = byte_mask(K - k0);
    const int64_t g0 = k0 / kKGroup;
    const int64_t ng = groups - g0 < kGroupsPerVec ? groups - g0 : kGroupsPerVec;
    for (int v = 0; v < kVecs; ++v) {
      __m512i r[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        const int col = v * kLanes + i;
        r[i] = col < nr ? _mm512_maskz_mov_epi8(km, _mm512_xor_si512(
                                                        _mm512_maskz_loadu_epi8(km, b + (n0 + col) * K + k0), flip))
                        : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int64_t g = 0; g < ng; ++g)
        _mm512_storeu_si512(dst + ((g0 + g) * NR + v * kLanes) * kKGroup, r[g]);
    }
  }
}

// The epilogue (gemm_epilogue.h) applied to a full-width tile straight from the accumulators, with
// the output dtype and the bias a compile-time choice (no branch per vector in the unrolled stores).
template <int MR>
QBERT_AVX512 inline void store_tile_i32(__m512i (&acc)[MR][kVecsPerPanel], const Epilogue& e, int64_t m0,
                                        int64_t n0) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512i corr = _mm512_set1_epi32(e.corr[m0 + r]);
    int32_t* out = static_cast<int32_t*>(e.out) + (m0 + r) * e.ldo + n0;
#pragma GCC unroll 8
    for (int v = 0; v < kVecsPerPanel; ++v) _mm512_storeu_si512(out + v * kLanes, _mm512_sub_epi32(acc[r][v], corr));
  }
}

template <int MR, OutKind OUT, bool HAS_BIAS>
QBERT_AVX512 inline void store_tile_float(__m512i (&acc)[MR][kVecsPerPanel], const Epilogue& e, int64_t m0,
                                          int64_t n0) {
  __m512 ws[kVecsPerPanel], bias[kVecsPerPanel];
#pragma GCC unroll 8
  for (int v = 0; v < kVecsPerPanel; ++v) {
    ws[v] = _mm512_loadu_ps(e.w_scale + n0 + v * kLanes);
    bias[v] = HAS_BIAS ? load_bias16(e, n0 + v * kLanes, __mmask16(0xFFFF)) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512i corr = _mm512_set1_epi32(e.corr[m0 + r]);
    const __m512 xs = _mm512_set1_ps(e.x_scale[m0 + r]);
    const int64_t o = (m0 + r) * e.ldo + n0;
#pragma GCC unroll 8
    for (int v = 0; v < kVecsPerPanel; ++v) {
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr)), xs);
      QBERT_NO_CONTRACT(y);
      y = _mm512_mul_ps(y, ws[v]);
      QBERT_NO_CONTRACT(y);
      if constexpr (HAS_BIAS) y = _mm512_add_ps(y, bias[v]);
      if constexpr (OUT == OutKind::kF32) {
        if (e.stream)
          _mm512_stream_ps(static_cast<float*>(e.out) + o + v * kLanes, y);
        else
          _mm512_storeu_ps(static_cast<float*>(e.out) + o + v * kLanes, y);
      } else if constexpr (OUT == OutKind::kF16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(e.out) + o + v * kLanes),
                            _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(e.out) + o + v * kLanes),
                            f32_to_bf16_16(y));
      }
    }
  }
}

template <int MR, OutKind OUT>
QBERT_AVX512 inline void store_tile_float(__m512i (&acc)[MR][kVecsPerPanel], const Epilogue& e, int64_t m0,
                                          int64_t n0) {
  if (e.bias_kind != BiasKind::kNone) return store_tile_float<MR, OUT, true>(acc, e, m0, n0);
  store_tile_float<MR, OUT, false>(acc, e, m0, n0);
}

template <int MR>
QBERT_AVX512 inline void store_tile(__m512i (&acc)[MR][kVecsPerPanel], const Epilogue& e, int64_t m0, int64_t n0) {
  switch (e.out_kind) {
    case OutKind::kI32: return store_tile_i32<MR>(acc, e, m0, n0);
    case OutKind::kF32: return store_tile_float<MR, OutKind::kF32>(acc, e, m0, n0);
    case OutKind::kF16: return store_tile_float<MR, OutKind::kF16>(acc, e, m0, n0);
    case OutKind::kBF16: return store_tile_float<MR, OutKind::kBF16>(acc, e, m0, n0);
  }
}

// Cache lines to pull in while a micro-tile computes: `lines` lines from `p`, one every `every`
// k-groups. The driver points it at the source rows of the next panel it will pack (48 contiguous rows
// of b), so with cold weights the memory system streams them under the vpdpbusd work instead of
// stalling the pack: 128 x 3072 x 768 with the weight out of cache went 449 -> ~335 us (hot: ~325).
// T0 and T1 measured the same on Zen 5; the lines are needed within one panel's compute.
struct Prefetch {
  const int8_t* p = nullptr;
  int64_t lines = 0;
  int64_t every = 1;
};
constexpr int kLineBytes = 64;

// A full-width tile (nr == kNr) goes through store_tile; a ragged one, or one with a GELU epilogue,
// through `tile` [MR][kNr] and epilogue_row_avx512, which masks the columns past nr.
template <int MR>
QBERT_AVX512 inline void micro_kernel(const int8_t* a, int64_t lda, const uint8_t* bp, int64_t groups,
                                      const Epilogue& e, int64_t m0, int64_t n0, int nr, int32_t* tile,
                                      Prefetch pf) {
  __m512i acc[MR][kVecsPerPanel];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVecsPerPanel; ++v) acc[r][v] = _mm512_setzero_si512();
  int64_t pf_at = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (g == pf_at && pf.lines > 0) {
      _mm_prefetch(reinterpret_cast<const char*>(pf.p), _MM_HINT_T0);
      pf.p += kLineBytes;
      --pf.lines;
      pf_at += pf.every;
    }
    __m512i bv[kVecsPerPanel];
#pragma GCC unroll 8
    for (int v = 0; v < kVecsPerPanel; ++v) bv[v] = _mm512_loadu_si512(bp + v * kBytesPerVec);
    bp += kNr * kKGroup;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + g * kKGroup, sizeof(a4));
      const __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int v = 0; v < kVecsPerPanel; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], bv[v], av);
    }
  }
  // A GELU epilogue goes through the tile buffer and epilogue_row_avx512 (an L1 round trip of the int32
  // tile): a GELU variant of store_tile's unrolled stores made the shared kernel too large to inline well
  // (W4A8's forward, which reuses it, measured 79 -> 117 ms at BERT-base b1).
  if (nr == kNr && !e.gelu) return store_tile<MR>(acc, e, m0, n0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVecsPerPanel; ++v) _mm512_storeu_si512(tile + r * kNr + v * kLanes, acc[r][v]);
  for (int r = 0; r < MR; ++r) epilogue_row_avx512(e, tile + r * kNr, m0 + r, n0, nr);
}

// Dispatches the row count of the last, ragged micro-tile (mr <= kMr) to its unrolled kernel.
template <int MR = kMr>
QBERT_AVX512 inline void micro_kernel_rows(int mr, const int8_t* a, int64_t lda, const uint8_t* bp, int64_t groups,
                                           const Epilogue& e, int64_t m0, int64_t n0, int nr, int32_t* tile,
                                           Prefetch pf = {}) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_kernel_rows<MR - 1>(mr, a, lda, bp, groups, e, m0, n0, nr, tile, pf);
  }
  micro_kernel<MR>(a, lda, bp, groups, e, m0, n0, nr, tile, pf);
}

// corr = 128 * sum_k a[k], wrapping like the accumulators: vpdpbusd with all-ones u8 sums 4 bytes a lane.
QBERT_AVX512 inline int32_t row_corr(const int8_t* a, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kBytesPerVec)
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(byte_mask(K - k), a + k));
  return static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc)) << kCorrShift);
}

// ---- dot path for small M --------------------------------------------------------------------------
// out[r][c] = sum_k (b[c] ^ 0x80)[k] * a[r][k] over MB rows of a and NB rows of b (row-major, stride K).
template <int MB, int NB>
QBERT_AVX512 inline void dot_block(const int8_t* const* a_rows, const int8_t* const* b_rows, int64_t K,
                                   int32_t* out, int64_t ld_out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(kSignFlip));
  __m512i acc[MB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kBytesPerVec) {
    const __mmask64 km = byte_mask(K - k);  // masked-off a bytes are 0: those products vanish
    __m512i av[MB];
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) av[r] = _mm512_maskz_loadu_epi8(km, a_rows[r] + k);
#pragma GCC unroll 8
    for (int c = 0; c < NB; ++c) {
      const __m512i bv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, b_rows[c] + k), flip);
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], bv, av[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NB; ++c) out[r * ld_out + c] = _mm512_reduce_add_epi32(acc[r][c]);
}

constexpr int kDotMaxRows = 4;  // rows of A per dot block
constexpr int kDotWideCols = 8; // rows of B per block when A has <= 2 rows (<= 16 accumulators)
constexpr int kDotNarrowCols = 4;

inline int dot_cols(int mb) { return mb <= 2 ? kDotWideCols : kDotNarrowCols; }

// tile[mb][ld_tile] for B rows [n0, n0 + nr); b rows past N repeat row n_last (computed, then ignored).
QBERT_AVX512 inline void dot_tile(const int8_t* a, int64_t m0, int mb, const int8_t* b, int64_t n0, int nr,
                                  int64_t n_last, int64_t K, int32_t* tile, int64_t ld_tile) {
  const int8_t* a_rows[kDotMaxRows];
  for (int r = 0; r < mb; ++r) a_rows[r] = a + (m0 + r) * K;
  const int nb = dot_cols(mb);
  for (int c0 = 0; c0 < nr; c0 += nb) {
    const int8_t* b_rows[kDotWideCols];
    for (int c = 0; c < nb; ++c) {
      const int64_t n = n0 + c0 + c;
      b_rows[c] = b + (n <= n_last ? n : n_last) * K;
    }
    int32_t block[kDotMaxRows * kDotWideCols];
    switch (mb) {
      case 1: dot_block<1, kDotWideCols>(a_rows, b_rows, K, block, nb); break;
      case 2: dot_block<2, kDotWideCols>(a_rows, b_rows, K, block, nb); break;
      case 3: dot_block<3, kDotNarrowCols>(a_rows, b_rows, K, block, nb); break;
      default: dot_block<kDotMaxRows, kDotNarrowCols>(a_rows, b_rows, K, block, nb); break;
    }
    const int valid = nr - c0 < nb ? nr - c0 : nb;
    for (int r = 0; r < mb; ++r)
      for (int c = 0; c < valid; ++c) tile[r * ld_tile + c0 + c] = block[r * nb + c];
  }
}

}  // namespace qbert::cpu::avx512
