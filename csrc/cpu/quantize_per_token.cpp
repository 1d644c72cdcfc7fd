// quantize_per_token_cpu: x [M, K] f32/f16/bf16 -> q int8 [M, K], scale f32 [M]; bit-exact with
// qbert/ops/quantize_per_token.py::quantize_per_token_reference:
//   scale = amax_k |x| / 127 (f32 division; 1 where that is 0), q = clamp(rne(x / scale), +-127);
//   a row holding a NaN or an infinity: scale NaN, codes 0 (token_quant.h: its amax is an integer max).
// The quotient is a true division, not x * (1 / scale): the reciprocal rounds once more and flips
// codes that sit near a .5 boundary. Rows are independent, so the parallel split is over rows.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "cpu/isa.h"
#include "cpu/token_quant.h"
#include "cpu/parallel.h"

namespace qbert::cpu {
namespace {

using token::kQmax;
constexpr int kWordBits = 16;    // a bf16 is the high half of a f32: shift its bits up by 16
// Rows per parallel task: enough work (rows * K elements) that a task outweighs its scheduling.
constexpr int64_t kMinElemsPerTask = 16384;

enum class In { kF32, kF16, kBF16 };

// ---- scalar: the portable path and every vector path's tail ----------------------------------------
inline float load_scalar(const void* x, int64_t i, In in) {
  switch (in) {
    case In::kF32: return static_cast<const float*>(x)[i];
    case In::kF16: return static_cast<float>(static_cast<const c10::Half*>(x)[i]);
    case In::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(x)[i]);
  }
  return 0.0f;
}

inline int8_t quantize_scalar(float v, float scale) {
  // nearbyint rounds half to even in the default rounding mode, as torch.round does.
  const float r = std::nearbyint(v / scale);
  return static_cast<int8_t>(std::fmin(std::fmax(r, -kQmax), kQmax));
}

// max_k of token::abs_bits(x[k]) over k in [k0, K).
uint32_t amax_bits_scalar(const void* x, int64_t k0, int64_t K, In in, uint32_t amax_bits) {
  for (int64_t k = k0; k < K; ++k) amax_bits = std::max(amax_bits, token::abs_bits(load_scalar(x, k, in)));
  return amax_bits;
}

// A row holding a NaN or an infinity: codes 0, scale NaN.
float nonfinite_row(int64_t K, int8_t* q) {
  std::fill(q, q + K, int8_t{0});
  return token::nonfinite_scale();
}

float row_scalar(const void* x, int64_t K, In in, int8_t* q) {
  const uint32_t amax_bits = amax_bits_scalar(x, 0, K, in, 0);
  if (!token::finite_row(amax_bits)) return nonfinite_row(K, q);
  const float scale = token::scale_of(token::from_bits(amax_bits));
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_scalar(load_scalar(x, k, in), scale);
  return scale;
}

// ---- AVX2 (+F16C): 8 lanes -------------------------------------------------------------------------
constexpr int kLanes8 = 8;

__attribute__((target("avx2,f16c"))) inline __m256 load8(const void* x, int64_t i, In in) {
  switch (in) {
    case In::kF32: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    case In::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    case In::kBF16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), kWordBits));
    }
  }
  return _mm256_setzero_ps();
}

__attribute__((target("avx2,f16c"))) float row_avx2(const void* x, int64_t K, In in, int8_t* q) {
  // The max of |x|'s bit patterns as integers (token_quant.h: a NaN or an infinity cannot get lost).
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(token::kAbsMask));
  __m256i vmax = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + kLanes8 <= K; k += kLanes8)
    vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(load8(x, k, in)), abs_mask));
  alignas(32) uint32_t lanes[kLanes8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
  uint32_t amax_bits = 0;
  for (uint32_t l : lanes) amax_bits = std::max(amax_bits, l);
  amax_bits = amax_bits_scalar(x, k, K, in, amax_bits);
  if (!token::finite_row(amax_bits)) return nonfinite_row(K, q);
  const float scale = token::scale_of(token::from_bits(amax_bits));

  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 hi = _mm256_set1_ps(kQmax), lo = _mm256_set1_ps(-kQmax);
  for (k = 0; k + kLanes8 <= K; k += kLanes8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(load8(x, k, in), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    // Values are already in [-127, 127], so the saturating packs are plain narrowing here.
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < K; ++k) q[k] = quantize_scalar(load_scalar(x, k, in), scale);
  return scale;
}

// ---- AVX-512: 16 lanes, masked tails ---------------------------------------------------------------
constexpr int kLanes16 = 16;

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const void* x, int64_t i, In in,
                                                                         __mmask16 m) {
  switch (in) {
    case In::kF32: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
    case In::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i));
    case In::kBF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), kWordBits));
    }
  }
  return _mm512_setzero_ps();
}

// token::abs_bits of x[i .. i + 16) (0 in masked-off lanes).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i abs_bits16(const void* x, int64_t i, In in,
                                                                              __mmask16 m) {
  return _mm512_and_epi32(_mm512_castps_si512(load16(x, i, in, m)),
                          _mm512_set1_epi32(static_cast<int>(token::kAbsMask)));
}

// 16 codes clamp(rne(x[k..] / scale), +-127) as int32 (a true division: see the top of the file).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i codes16(const void* x, In in, __m512 vscale,
                                                                           __m512 lo, __m512 hi, int64_t k,
                                                                           __mmask16 m) {
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(x, k, in, m), vscale),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float row_avx512(const void* x, int64_t K, In in, int8_t* q) {
  // Four running maxima: one would serialise every step on the latency of vpmaxud. They are maxima of
  // |x|'s bit patterns as integers (token_quant.h: a NaN or an infinity cannot get lost).
  constexpr int kChains = 4;
  const __mmask16 all = 0xFFFF;
  __m512i vmax[kChains] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                           _mm512_setzero_si512()};
  int64_t k = 0;
  for (; k + kChains * kLanes16 <= K; k += kChains * kLanes16)
#pragma GCC unroll 4
    for (int c = 0; c < kChains; ++c) vmax[c] = _mm512_max_epu32(vmax[c], abs_bits16(x, k + c * kLanes16, in, all));
  for (; k < K; k += kLanes16) {
    const __mmask16 m = K - k >= kLanes16 ? all : __mmask16((1u << (K - k)) - 1);
    vmax[0] = _mm512_max_epu32(vmax[0], abs_bits16(x, k, in, m));  // masked-off lanes load 0
  }
  const uint32_t amax_bits = _mm512_reduce_max_epu32(
      _mm512_max_epu32(_mm512_max_epu32(vmax[0], vmax[1]), _mm512_max_epu32(vmax[2], vmax[3])));
  if (!token::finite_row(amax_bits)) return nonfinite_row(K, q);
  const float scale = token::scale_of(token::from_bits(amax_bits));

  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 hi = _mm512_set1_ps(kQmax), lo = _mm512_set1_ps(-kQmax);
  // 64 codes a step, narrowed with in-register packs and stored as one 64-byte vector: a narrowing
  // store per 16 codes (vpmovsdb to memory) is several times slower on current cores. The packs
  // saturate, but the codes are already in [-127, 127]; they interleave 128-bit lanes, which the
  // dword permutation undoes.
  constexpr int kStep = 4 * kLanes16;
  const __m512i unlane = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (k = 0; k + kStep <= K; k += kStep) {
    const __m512i c0 = codes16(x, in, vscale, lo, hi, k, all), c1 = codes16(x, in, vscale, lo, hi, k + kLanes16, all);
    const __m512i c2 = codes16(x, in, vscale, lo, hi, k + 2 * kLanes16, all), c3 = codes16(x, in, vscale, lo, hi, k + 3 * kLanes16, all);
    const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3));
    _mm512_storeu_si512(q + k, _mm512_permutexvar_epi32(unlane, bytes));
  }
  for (; k < K; k += kLanes16) {
    const __mmask16 m = K - k >= kLanes16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, m, codes16(x, in, vscale, lo, hi, k, m));
  }
  return scale;
}

using RowFn = float (*)(const void*, int64_t, In, int8_t*);

RowFn row_fn(Isa isa) {
  switch (isa) {
    case Isa::kAmxInt8:  // no matrix product here: the AVX-512 body
    case Isa::kAvx512Vnni: return row_avx512;
    case Isa::kAvxVnni:  // VNNI adds nothing to quantization: the AVX2 path is the AVX-VNNI one
    case Isa::kAvx2: return row_avx2;
    case Isa::kScalar: return row_scalar;
  }
  return row_scalar;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x) {
  constexpr const char* op = "quantize_per_token_cpu";
  QBERT_CHECK_CPU(x, op);
  QBERT_CHECK_DIM(x, 2, op);
  QBERT_CHECK_CONTIGUOUS(x, op);
  In in;
  switch (x.scalar_type()) {
    case at::kFloat: in = In::kF32; break;
    case at::kHalf: in = In::kF16; break;
    case at::kBFloat16: in = In::kBF16; break;
    default: QBERT_CHECK(false, op, "x must be Float, Half or BFloat16, got ", x.scalar_type());
  }
  const int64_t M = x.size(0), K = x.size(1);
  QBERT_CHECK(K >= 1, op, "x must have K >= 1, got shape ", x.sizes());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));

  const RowFn fn = row_fn(active_isa());
  const auto* xp = static_cast<const char*>(x.data_ptr());
  const int64_t row_bytes = K * static_cast<int64_t>(x.element_size());
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / K);
  parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) sp[m] = fn(xp + m * row_bytes, K, in, qp + m * K);
  });
  return {q, scale};
}

TORCH_LIBRARY_FRAGMENT(qbert, m) { m.def("quantize_per_token_cpu(Tensor x) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("quantize_per_token_cpu", &quantize_per_token_cpu); }

}  // namespace qbert::cpu
