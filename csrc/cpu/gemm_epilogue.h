// The fused epilogue of the int8 GEMM, applied to each finished int32 tile while it is still in registers
// (store_tile in gemm_avx512.h) or in L1 (the row functions here), never as a second pass over an [M, N] int32 buffer.
//   int8_gemm:   out[m, n] = acc - corr[m]                                       (int32, wrapping)
//   int8_linear: out[m, n] = ((float(acc - corr[m]) * x_scale[m]) * w_scale[n]) + bias[n]
//                then, with Epilogue::gelu (AVX-512 paths only), gelu16 of that (qbert's own erf: within
//                a few ulp of torch's GELU, not its bits)
// in that order, each product and sum rounded on its own (QBERT_NO_CONTRACT), so the result is the
// reference's float32 arithmetic bit for bit; then rounded to f16/bf16 to nearest-even as torch's
// .to() does. corr[m] = 128 * sum_k a[m, k] undoes the VNNI sign trick (see gemm_avx512.h); it is
// null on the paths that multiply signed by signed.
// Torch-free: raw pointers only.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qbert::cpu {

enum class OutKind { kI32, kF32, kF16, kBF16 };
enum class BiasKind { kNone, kF32, kF16, kBF16 };

struct Epilogue {
  const int32_t* corr = nullptr;     // [M] or null
  const float* x_scale = nullptr;    // [M]; int8_linear only
  const float* w_scale = nullptr;    // [N]; int8_linear only
  const void* bias = nullptr;        // [N] of bias_kind, or null
  BiasKind bias_kind = BiasKind::kNone;
  void* out = nullptr;               // [M, ldo] of out_kind
  OutKind out_kind = OutKind::kI32;
  int64_t ldo = 0;
  bool stream = false;               // f32, AVX-512 paths, whole vectors at multiples of 16 columns:
                                     // non-temporal stores; the driver sets it only when out and each
                                     // row are 64-byte aligned
  bool gelu = false;                 // float outputs, AVX-512 paths only: the exact (erf) GELU, gelu16
};

// An empty asm that claims to rewrite v: the compiler can no longer fuse the multiply before it with
// the add after it into an FMA (GCC contracts vector intrinsics too under its default
// -ffp-contract=fast), so each op rounds exactly as PyTorch's separate kernels do.
#define QBERT_NO_CONTRACT(v) asm("" : "+v"(v))

constexpr int kBf16Shift = 16;            // bf16 = high half of the f32 bit pattern
constexpr int32_t kBf16RoundBias = 0x7FFF;  // + lsb of the kept half: round to nearest, ties to even
constexpr int16_t kBf16QuietNan = 0x7FC0;   // what c10::BFloat16 gives for any NaN

// ---- AVX-512 (16 lanes, masked tails) --------------------------------------------------------------
constexpr int kLanes512 = 16;

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_bias16(const Epilogue& e, int64_t n,
                                                                             __mmask16 k) {
  switch (e.bias_kind) {
    case BiasKind::kF32: return _mm512_maskz_loadu_ps(k, static_cast<const float*>(e.bias) + n);
    case BiasKind::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(e.bias) + n));
    case BiasKind::kBF16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(e.bias) + n)), kBf16Shift));
    case BiasKind::kNone: break;
  }
  return _mm512_setzero_ps();
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i f32_to_bf16_16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, kBf16Shift), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(kBf16RoundBias)), lsb),
                                kBf16Shift);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(kBf16QuietNan));
  return _mm512_cvtepi32_epi16(r);
}

// The exact GELU, x / 2 * (1 + erf(x / sqrt 2)), on 16 lanes. erf is the odd / even rational minimax fit of
// degree 13 / 8 on [-4, 4] (Eigen's and XLA's float erf; beyond |4| erf is +-1 to float precision), about
// a third of the instructions of torch's vectorized erf and no exp: within a few ulp of torch's GELU.
// NaN stays NaN (the min / max pass the clamp bound, the final x * ... the NaN); +inf gives inf.
constexpr float kSqrtHalf = 0.707106781186547524f;
constexpr float kErfClamp = 4.0f;
constexpr float kErfNum[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                             -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                             -1.60960333262415e-02f};  // x^13 .. x^1
constexpr float kErfDen[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                             -7.37332916720468e-03f, -1.42647390514189e-02f};  // x^8 .. x^0

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 gelu16(__m512 x) {
  const __m512 t = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x, _mm512_set1_ps(kSqrtHalf)),
                                               _mm512_set1_ps(kErfClamp)),
                                 _mm512_set1_ps(-kErfClamp));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(kErfNum[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(t2, p, _mm512_set1_ps(kErfNum[i]));
  p = _mm512_mul_ps(t, p);
  __m512 q = _mm512_set1_ps(kErfDen[0]);
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(t2, q, _mm512_set1_ps(kErfDen[i]));
  const __m512 erf = _mm512_div_ps(p, q);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
}

// Stores 16 finished f32 values at element offset o of the output, converted to its dtype.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store16(const Epilogue& e, int64_t o, __m512 y,
                                                                        __mmask16 k = __mmask16(0xFFFF)) {
  switch (e.out_kind) {
    case OutKind::kF32: _mm512_mask_storeu_ps(static_cast<float*>(e.out) + o, k, y); break;
    case OutKind::kF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + o, k,
                               _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case OutKind::kBF16: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.out) + o, k, f32_to_bf16_16(y)); break;
    case OutKind::kI32: break;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void epilogue_row_avx512(const Epilogue& e,
                                                                                    const int32_t* acc, int64_t m,
                                                                                    int64_t n0, int nr) {
  const __m512i corr = _mm512_set1_epi32(e.corr ? e.corr[m] : 0);
  const int64_t o = m * e.ldo + n0;
  const __m512 xs = _mm512_set1_ps(e.x_scale ? e.x_scale[m] : 0.0f);
  for (int j = 0; j < nr; j += kLanes512) {
    const __mmask16 k = nr - j >= kLanes512 ? __mmask16(0xFFFF) : __mmask16((1u << (nr - j)) - 1);
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, acc + j), corr);
    if (e.out_kind == OutKind::kI32) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(e.out) + o + j, k, a);
      continue;
    }
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(a), xs);
    QBERT_NO_CONTRACT(y);
    y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(k, e.w_scale + n0 + j));
    QBERT_NO_CONTRACT(y);
    if (e.bias_kind != BiasKind::kNone) y = _mm512_add_ps(y, load_bias16(e, n0 + j, k));
    if (e.gelu) y = gelu16(y);
    if (e.stream && k == __mmask16(0xFFFF))  // f32, a whole aligned vector (Epilogue::stream)
      _mm512_stream_ps(static_cast<float*>(e.out) + o + j, y);
    else
      store16(e, o + j, y, k);
  }
}

// ---- AVX2 + F16C (8 lanes; a ragged tail goes through an 8-wide stack buffer) ----------------------
constexpr int kLanes256 = 8;

__attribute__((target("avx2,f16c"))) inline __m256 load_bias8(const Epilogue& e, const void* bias, int64_t n) {
  switch (e.bias_kind) {
    case BiasKind::kF32: return _mm256_loadu_ps(static_cast<const float*>(bias) + n);
    case BiasKind::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(bias) + n)));
    case BiasKind::kBF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(bias) + n))),
          kBf16Shift));
    case BiasKind::kNone: break;
  }
  return _mm256_setzero_ps();
}

__attribute__((target("avx2,f16c"))) inline __m128i f32_to_bf16_8(__m256 y) {
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, kBf16Shift), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(kBf16RoundBias)), lsb),
                                kBf16Shift);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kBf16QuietNan), nan);
  // r holds 8 values < 2^16: pack the two 128-bit halves into 8 uint16 in order.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 8 columns of row m starting at n (acc, w_scale, bias and out already offset by the caller for tails).
__attribute__((target("avx2,f16c"))) inline void epilogue8_avx2(const Epilogue& e, const int32_t* acc, __m256i corr,
                                                                __m256 xs, const float* ws, const void* bias,
                                                                int64_t bias_off, void* out, int64_t out_off) {
  const __m256i a = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc)), corr);
  if (e.out_kind == OutKind::kI32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(out) + out_off), a);
    return;
  }
  __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(a), xs);
  QBERT_NO_CONTRACT(y);
  y = _mm256_mul_ps(y, _mm256_loadu_ps(ws));
  QBERT_NO_CONTRACT(y);
  if (e.bias_kind != BiasKind::kNone) y = _mm256_add_ps(y, load_bias8(e, bias, bias_off));
  switch (e.out_kind) {
    case OutKind::kF32: _mm256_storeu_ps(static_cast<float*>(out) + out_off, y); break;
    case OutKind::kF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + out_off),
                       _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case OutKind::kBF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + out_off), f32_to_bf16_8(y));
      break;
    case OutKind::kI32: break;
  }
}

__attribute__((target("avx2,f16c"))) inline void epilogue_row_avx2(const Epilogue& e, const int32_t* acc, int64_t m,
                                                                  int64_t n0, int nr) {
  const __m256i corr = _mm256_set1_epi32(e.corr ? e.corr[m] : 0);
  const __m256 xs = _mm256_set1_ps(e.x_scale ? e.x_scale[m] : 0.0f);
  const int64_t o = m * e.ldo + n0;
  int j = 0;
  for (; j + kLanes256 <= nr; j += kLanes256)
    epilogue8_avx2(e, acc + j, corr, xs, e.w_scale ? e.w_scale + n0 + j : nullptr, e.bias, n0 + j, e.out, o + j);
  if (j == nr) return;
  // Ragged tail: stage the inputs in zero-padded buffers, compute 8 lanes, copy out the valid ones.
  const int rest = nr - j;
  constexpr int kMaxElemBytes = sizeof(float);  // the widest element: f32 / int32
  alignas(32) int32_t acc8[kLanes256] = {};
  alignas(32) float ws8[kLanes256] = {};
  alignas(32) unsigned char bias8[kLanes256 * kMaxElemBytes] = {};
  alignas(32) unsigned char out8[kLanes256 * kMaxElemBytes];
  std::memcpy(acc8, acc + j, rest * sizeof(int32_t));
  if (e.w_scale) std::memcpy(ws8, e.w_scale + n0 + j, rest * sizeof(float));
  const int bias_bytes = e.bias_kind == BiasKind::kF32 ? sizeof(float) : sizeof(uint16_t);
  if (e.bias_kind != BiasKind::kNone)
    std::memcpy(bias8, static_cast<const unsigned char*>(e.bias) + (n0 + j) * bias_bytes, rest * bias_bytes);
  epilogue8_avx2(e, acc8, corr, xs, ws8, bias8, 0, out8, 0);
  const int out_bytes =
      (e.out_kind == OutKind::kF16 || e.out_kind == OutKind::kBF16) ? sizeof(uint16_t) : sizeof(float);
  std::memcpy(static_cast<unsigned char*>(e.out) + (o + j) * out_bytes, out8, rest * out_bytes);
}

}  // namespace qbert::cpu
