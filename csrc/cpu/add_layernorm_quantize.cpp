// add_layernorm_quantize_cpu: x [M, K] (+ residual [M, K]) f32/f16/bf16 -> y [M, K] x.dtype, y_q int8 [M, K],
// y_scale f32 [M]. Spec: qbert/ops/add_layernorm_quantize.py. Per row, with the row held in an f32 buffer
// that stays in L1 (a BERT row is 3-4 KiB):
//   1. h = x + residual, summed in f32 and rounded to x.dtype: for f16 / bf16 that is the correctly
//      rounded sum PyTorch's add gives (rounding twice is harmless when f32's 24 bits >= 2p + 2, p = 11, 8);
//   2. max |h| (an integer max of bit patterns, token_quant.h): a row holding a NaN or an infinity gives
//      y = NaN, codes 0, scale NaN; a row with max |h| > kUnscaledMax is multiplied by a power of two c
//      (exact) that brings it into [2, 4), and eps by c^2, so that its sum of squares cannot overflow;
//   3. the mean, summed in f64 (exact for a constant row: K copies of a 24-bit value need at most
//      24 + log2 K < 53 bits), rounded to f32; then the variance as the f32 mean of (h - mean)^2: two
//      passes, which do not cancel as E[h^2] - mean^2 would;
//   4. y = ((h - mean) * rstd) * weight + bias, rstd = 1 / sqrt(var + eps), rounded to x.dtype;
//   5. the per-token int8 codes of that rounded y, bit-exact with quantize_per_token_reference (scale =
//      amax / 127, codes = clamp(round_half_even(y / scale), +-127) with a true division, see
//      quantize_per_token.cpp for why not a reciprocal; NaN scale and codes 0 for a non-finite y row).
// y agrees with the exact LayerNorm (the reference's, in f64) to float32 rounding (the float tier), not bit
// for bit.
//
// The loops are plain C++ written so that GCC vectorizes them: every reduction keeps kLanes independent
// partial results (a vectorizer may not reassociate a single float sum). The same code is compiled once
// per ISA (target attributes on always-inlined bodies) and picked by active_isa(). Contraction into FMAs
// is off in this file, and the partial sums have the same order on every ISA, so every ISA gives the same
// bits (tests/ops/test_add_layernorm_quantize.py checks).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/isa.h"
#include "cpu/token_quant.h"
#include "cpu/parallel.h"

// Everything below rounds each product and sum on its own (GCC's default is -ffp-contract=fast).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace qbert::cpu {
namespace {

using token::kQmax;
// Partial sums / maxima per reduction: one AVX-512 vector of f32 (two AVX2 ones). Fixed for every ISA so
// that the summation order, and with it every result bit, does not depend on the ISA.
constexpr int kLanes = 16;
// Rows per parallel task: enough work (rows * K elements) that a task outweighs its scheduling.
constexpr int64_t kMinElemsPerTask = 16384;
// The largest max |h| normalized as it is: then |h - mean| <= 2^33, and K (2^33)^2 stays below f32's max
// (2^128) for every K < 2^62. Rows of larger values are scaled first (step 2).
constexpr float kUnscaledMax = 4294967296.0f;  // 2^32
constexpr uint32_t kExponentMask = 0x7f800000u;  // f32's exponent field: v & it is 2^e for v = m 2^e
constexpr float kScaledMin = 2.0f;               // a scaled row's max |h| lies in [2, 4)
// The eps the kernel accepts (qbert/ops/add_layernorm_quantize.py's EPS_MIN / EPS_MAX): normal f32 numbers.
constexpr double kEpsMin = std::numeric_limits<float>::min();
constexpr double kEpsMax = std::numeric_limits<float>::max();

#define QBERT_INLINE inline __attribute__((always_inline))

struct Args {
  const void* x;         // [M, K] T
  const void* residual;  // [M, K] T, or null
  const float* weight;   // [K]
  const float* bias;     // [K], or null
  void* y;               // [M, K] T
  int8_t* q;             // [M, K]
  float* scale;          // [M]
  int64_t K;
  float eps;
};

// Sums the kLanes partials pairwise, in the same order on every ISA.
template <class Acc>
QBERT_INLINE Acc fold_sum(Acc* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] = acc[j] + acc[j + width];
  return acc[0];
}

// sum_k f(v[k]) over k < K with kLanes partial sums of type Acc (lane = k % kLanes).
template <class Acc, class F>
QBERT_INLINE Acc lane_sum(const float* v, int64_t K, F f) {
  Acc acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = acc[j] + f(v[k + j]);
  for (int j = 0; k + j < K; ++j) acc[j] = acc[j] + f(v[k + j]);
  return fold_sum(acc);
}

// max_k token::abs_bits(v[k]): max |v| as a bit pattern, at or above kInfBits when v holds a NaN or an inf.
QBERT_INLINE uint32_t lane_amax_bits(const float* v, int64_t K) {
  uint32_t acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], token::abs_bits(v[k + j]));
  for (int j = 0; k + j < K; ++j) acc[j] = std::max(acc[j], token::abs_bits(v[k + j]));
  uint32_t amax = 0;
  for (int j = 0; j < kLanes; ++j) amax = std::max(amax, acc[j]);
  return amax;
}

// c = 2 / 2^e for a positive normal float v = m 2^e, m in [1, 2): v c lies in [2, 4). c is a power of two
// (the division is exact), and a normal float for every finite v (c >= 2^-126), so multiplying by it is
// exact barring underflow.
QBERT_INLINE float scale_factor(float v) {
  return kScaledMin / token::from_bits(token::abs_bits(v) & kExponentMask);
}

// ---- conversions between a row of T and f32 -----------------------------------------------------
// Rounding is to nearest even both ways, as torch's .to(). The plain loops vectorize for f32 and bf16
// (a 16-bit shift and integer rounding); f16 needs F16C's converts, which only the ISA bodies may use.

template <class T>
struct PlainCvt {
  static QBERT_INLINE void load(const T* src, float* dst, int64_t K) {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
  }
  static QBERT_INLINE void store(const float* src, T* dst, int64_t K) {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<T>(src[k]);
  }
};

constexpr int kLanes8 = 8;

struct F16cCvt256 {
  __attribute__((target("avx2,f16c"))) static void load(const c10::Half* src, float* dst, int64_t K) {
    int64_t k = 0;
    for (; k + kLanes8 <= K; k += kLanes8)
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    for (; k < K; ++k) dst[k] = static_cast<float>(src[k]);
  }
  __attribute__((target("avx2,f16c"))) static void store(const float* src, c10::Half* dst, int64_t K) {
    int64_t k = 0;
    for (; k + kLanes8 <= K; k += kLanes8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; k < K; ++k) dst[k] = static_cast<c10::Half>(src[k]);
  }
};

struct F16cCvt512 {
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void load(const c10::Half* src, float* dst,
                                                                        int64_t K) {
    for (int64_t k = 0; k < K; k += kLanes) {
      const __mmask16 m = K - k >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      _mm512_mask_storeu_ps(dst + k, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + k)));
    }
  }
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void store(const float* src, c10::Half* dst,
                                                                         int64_t K) {
    for (int64_t k = 0; k < K; k += kLanes) {
      const __mmask16 m = K - k >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      _mm256_mask_storeu_epi16(dst + k, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + k),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
};

// ---- one row ------------------------------------------------------------------------------------------

// h, y, codes and scale of row m. `h` and `tmp` are [K] f32 scratch rows.
template <class T, class Cvt, bool kResidual, bool kBias>
QBERT_INLINE void row(const Args& a, int64_t m, float* h, float* tmp) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t K = a.K;
  const T* x = static_cast<const T*>(a.x) + m * K;
  T* y = static_cast<T*>(a.y) + m * K;
  Cvt::load(x, h, K);
  if constexpr (kResidual) {
    Cvt::load(static_cast<const T*>(a.residual) + m * K, tmp, K);
    for (int64_t k = 0; k < K; ++k) h[k] = h[k] + tmp[k];
    if constexpr (!kF32) {
      // Round the sums to T (through y's row, which is written for good below).
      Cvt::store(h, y, K);
      Cvt::load(y, h, K);
    }
  }

  int8_t* q = a.q + m * K;
  const uint32_t hmax_bits = lane_amax_bits(h, K);
  if (!token::finite_row(hmax_bits)) {  // a NaN or an infinity: y = NaN, codes 0, scale NaN
    std::fill(h, h + K, std::numeric_limits<float>::quiet_NaN());
    Cvt::store(h, y, K);
    std::fill(q, q + K, int8_t{0});
    a.scale[m] = token::nonfinite_scale();
    return;
  }
  float eps = a.eps;
  if (token::from_bits(hmax_bits) > kUnscaledMax) {
    // Normalization is invariant under h -> c h, eps -> c^2 eps; c is a power of two, so h * c is exact.
    const float c = scale_factor(token::from_bits(hmax_bits));
    for (int64_t k = 0; k < K; ++k) h[k] = h[k] * c;
    eps = eps * c * c;  // may underflow to 0: only where eps is negligible beside the variance
  }

  const double count = static_cast<double>(K);
  const float mean = static_cast<float>(lane_sum<double>(h, K, [](float v) { return static_cast<double>(v); }) / count);
  const float var =
      lane_sum<float>(h, K, [mean](float v) { return (v - mean) * (v - mean); }) / static_cast<float>(count);
  // var + eps is 0 only for a constant row (h - mean = 0 everywhere: the f64 mean is exact) of scaled
  // values whose scaled eps underflowed; any finite rstd then gives y = bias, as the reference does.
  const float var_eps = var + eps;
  const float rstd = var_eps > 0.0f ? 1.0f / std::sqrt(var_eps) : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float v = ((h[k] - mean) * rstd) * a.weight[k];
    if constexpr (kBias) v = v + a.bias[k];
    h[k] = v;
  }
  Cvt::store(h, y, K);
  if constexpr (!kF32) Cvt::load(y, h, K);  // the codes quantize the rounded y that is returned

  const uint32_t amax_bits = lane_amax_bits(h, K);
  if (!token::finite_row(amax_bits)) {  // y overflowed (or a parameter is not finite): codes 0, scale NaN
    std::fill(q, q + K, int8_t{0});
    a.scale[m] = token::nonfinite_scale();
    return;
  }
  const float scale = token::scale_of(token::from_bits(amax_bits));
  for (int64_t k = 0; k < K; ++k) {
    // nearbyint rounds half to even in the default rounding mode, as torch.round does.
    float c = std::nearbyint(h[k] / scale);
    c = c < -kQmax ? -kQmax : (c > kQmax ? kQmax : c);
    q[k] = static_cast<int8_t>(static_cast<int32_t>(c));
  }
  a.scale[m] = scale;
}

template <class T, class Cvt>
QBERT_INLINE void rows(const Args& a, int64_t m0, int64_t m1, float* h, float* tmp) {
  const bool residual = a.residual != nullptr, bias = a.bias != nullptr;
  for (int64_t m = m0; m < m1; ++m) {
    if (residual && bias) row<T, Cvt, true, true>(a, m, h, tmp);
    else if (residual) row<T, Cvt, true, false>(a, m, h, tmp);
    else if (bias) row<T, Cvt, false, true>(a, m, h, tmp);
    else row<T, Cvt, false, false>(a, m, h, tmp);
  }
}

// The same body for each ISA; the target attribute lets GCC vectorize it with that ISA's registers.
template <class T>
void rows_scalar(const Args& a, int64_t m0, int64_t m1, float* h, float* tmp) {
  rows<T, PlainCvt<T>>(a, m0, m1, h, tmp);
}

template <class T>
__attribute__((target("avx2,f16c"))) void rows_avx2(const Args& a, int64_t m0, int64_t m1, float* h, float* tmp) {
  using Cvt = std::conditional_t<std::is_same_v<T, c10::Half>, F16cCvt256, PlainCvt<T>>;
  rows<T, Cvt>(a, m0, m1, h, tmp);
}

template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(const Args& a, int64_t m0, int64_t m1,
                                                                      float* h, float* tmp) {
  using Cvt = std::conditional_t<std::is_same_v<T, c10::Half>, F16cCvt512, PlainCvt<T>>;
  rows<T, Cvt>(a, m0, m1, h, tmp);
}

template <class T>
using RowsFn = void (*)(const Args&, int64_t, int64_t, float*, float*);

template <class T>
RowsFn<T> rows_fn(Isa isa) {
  switch (isa) {
    case Isa::kAmxInt8:  // no matrix product here: the AVX-512 body
    case Isa::kAvx512Vnni: return rows_avx512<T>;
    case Isa::kAvxVnni:  // VNNI adds nothing here: the AVX2 body is the AVX-VNNI one
    case Isa::kAvx2: return rows_avx2<T>;
    case Isa::kScalar: return rows_scalar<T>;
  }
  return rows_scalar<T>;
}

template <class T>
void run(const Args& a, int64_t M) {
  const RowsFn<T> fn = rows_fn<T>(active_isa());
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / a.K);
  parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<float> scratch(2 * a.K);  // h and tmp, [K] each: one pair per task, reused for its rows
    fn(a, m0, m1, scratch.data(), scratch.data() + a.K);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_quantize_cpu(const at::Tensor& x,
                                                                          const std::optional<at::Tensor>& residual,
                                                                          const at::Tensor& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps) {
  constexpr const char* op = "add_layernorm_quantize_cpu";
  QBERT_CHECK_CPU(x, op);
  QBERT_CHECK_DIM(x, 2, op);
  QBERT_CHECK_CONTIGUOUS(x, op);
  const at::ScalarType dtype = x.scalar_type();
  QBERT_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              "x must be Float, Half or BFloat16, got ", dtype);
  const int64_t M = x.size(0), K = x.size(1);
  QBERT_CHECK(K >= 1, op, "x must have K >= 1, got shape ", x.sizes());
  check_layernorm_operands(op, x, residual, weight, bias);
  QBERT_CHECK(eps >= kEpsMin && eps <= kEpsMax, op, "eps must be a normal float32 number in [", kEpsMin, ", ",
              kEpsMax, "] (added to a float32 variance), got ", eps);

  // [K] each: the kernel reads f32 parameters (no copy when they already are contiguous f32).
  const at::Tensor weight_f32 = weight.to(at::kFloat).contiguous();
  const at::Tensor bias_f32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, K}, x.options());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  const Args a{x.data_ptr(), residual ? residual->data_ptr() : nullptr, weight_f32.data_ptr<float>(),
               bias ? bias_f32.data_ptr<float>() : nullptr, y.data_ptr(), q.data_ptr<int8_t>(),
               scale.data_ptr<float>(), K, static_cast<float>(eps)};
  switch (dtype) {
    case at::kFloat: run<float>(a, M); break;
    case at::kHalf: run<c10::Half>(a, M); break;
    default: run<c10::BFloat16>(a, M); break;  // the dtype check admits nothing else
  }
  return {y, q, scale};
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("add_layernorm_quantize_cpu(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("add_layernorm_quantize_cpu", &add_layernorm_quantize_cpu); }

}  // namespace qbert::cpu

#pragma GCC pop_options
