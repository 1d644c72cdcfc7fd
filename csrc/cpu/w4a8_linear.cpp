// w4a8_linear_cpu: 2/3/4-bit weight codes x per-token int8 activations on the int8 GEMM kernels,
// out [M, N] in x's dtype. Spec: qbert/ops/w4a8_linear.py::w4a8_linear_reference; layout:
// qbert/quant/packing.py.
//
// Steps. x is quantized by quantize_per_token_cpu (the op's own codes). The weight codes are widened,
// one panel of columns at a time, straight into the u8 operand format of the VNNI micro-kernels
// (gemm_avx512.h: [K/4][48][4], gemm_avx2.h: [K/4][16][4]): the byte-sliced layout yields four
// consecutive k of a column as the four bytes of one word, which is exactly that format's unit, so
// widening is a shift, a mask and a byte-wise add per word, with no transpose (lowbit::vnni_chunk).
// Each micro-tile then runs the existing micro-kernel once per K group, giving that group's exact
// int32 sums (the sign trick's correction taken over the group's k), and folds them into a float32
// tile in the reference's order, each step rounded on its own:
//     y = 0;  y = y + float(acc_g) * scale[g, n]   for g = 0, 1, ...;   out = y * x_scale[m] + bias[n]
// so the float32 result equals the reference's bit for bit. Work is split over panels of columns.

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/gemm_avx2.h"
#include "cpu/gemm_avx512.h"
#include "cpu/isa.h"
#include "cpu/lowbit_args.h"
#include "cpu/lowbit_unpack.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace qbert::cpu {

namespace {

constexpr int kQuad = kBytesPerWord;  // k per int32 lane of vpdpbusd: the four bytes of a word
constexpr int kCorrShift = avx512::kCorrShift;  // corr = 128 * rowsum (gemm_avx512.h)
constexpr int kLanes = avx512::kLanes;
constexpr __mmask16 kAllLanes = 0xFFFF;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Problem {
  const int8_t* a;        // x_q [M, lda], rows zero-padded to whole quads
  int64_t lda;
  const int32_t* corr;    // [groups, M]: 128 * sum of a over the group's k (wrapping)
  const float* x_scale;   // [M]
  const int32_t* w;       // w_packed [ceil(K/32)*bits, N]
  const float* scales;    // [groups, N]
  const uint8_t* zeros;   // [groups, N]
  const float* bias;      // [N] f32, or null
  float* out;             // [M, N] f32
  int64_t M, N, K, group_size, groups;
};

// ---- plain-loop bodies for the AVX2 and scalar paths (vectorized for their wrapper's target) --------
// Neither target has FMA, so no multiply can contract with the add after it: each op rounds on its own.
QBERT_ALWAYS_INLINE int32_t corr_plain(const int8_t* a, int64_t len) {
  uint32_t sum = 0;  // wraps as the int32 accumulators do
  for (int64_t k = 0; k < len; ++k) sum += static_cast<uint32_t>(static_cast<int32_t>(a[k]));
  return static_cast<int32_t>(sum << kCorrShift);
}

// acc[r][j] = sum over `quads` quads of (panel byte) * a - corr[r], for the VNNI panel [quads][NR].
template <int NR>
QBERT_ALWAYS_INLINE void dot_plain(int mr, const int8_t* a, int64_t lda, const uint32_t* panel, int64_t quads,
                                   const int32_t* corr, int32_t* acc) {
  for (int r = 0; r < mr; ++r) {
    uint32_t sum[NR] = {};
    for (int64_t q = 0; q < quads; ++q) {
      const int8_t* a4 = a + r * lda + q * kQuad;
      for (int j = 0; j < NR; ++j) {
        const uint32_t b4 = panel[q * NR + j];
        int32_t d = 0;  // |d| <= 4 * 255 * 128
        for (int t = 0; t < kQuad; ++t)
          d += static_cast<int32_t>((b4 >> (lowbit::kByteBits * t)) & lowbit::kLowByte) * a4[t];
        sum[j] += static_cast<uint32_t>(d);
      }
    }
    for (int j = 0; j < NR; ++j) acc[r * NR + j] = static_cast<int32_t>(sum[j] - static_cast<uint32_t>(corr[r]));
  }
}

template <int NR>
QBERT_ALWAYS_INLINE void subtract_corr_plain(int mr, const int32_t* corr, int32_t* acc) {
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < NR; ++j)
      acc[r * NR + j] = static_cast<int32_t>(static_cast<uint32_t>(acc[r * NR + j]) - static_cast<uint32_t>(corr[r]));
}

// y[r][j] = y[r][j] + float(acc[r][j]) * scale[j]
template <int NR>
QBERT_ALWAYS_INLINE void accumulate_plain(int mr, int nr, const int32_t* acc, const float* scale, float* y) {
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) y[r * NR + j] = y[r * NR + j] + static_cast<float>(acc[r * NR + j]) * scale[j];
}

// out[r][j] = y[r][j] * x_scale[r] + bias[j]
template <int NR>
QBERT_ALWAYS_INLINE void finish_plain(int mr, int nr, const float* y, const float* x_scale, const float* bias,
                                      float* out, int64_t ldo) {
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) {
      const float v = y[r * NR + j] * x_scale[r];
      out[r * ldo + j] = bias ? v + bias[j] : v;
    }
}

// ---- one policy per ISA ---------------------------------------------------------------------------
struct Avx512 {
  static constexpr int kMr = avx512::kMr, kNr = avx512::kNr;
  static constexpr int kVecs = avx512::kVecsPerPanel;

  template <int BITS>
  QBERT_LOWBIT_AVX512 static void pack(const int32_t* chunk, int64_t ldw, int nr, const uint8_t* zero, uint32_t* dst) {
    lowbit::vnni_chunk<BITS>(chunk, ldw, nr, zero, dst, kNr);
  }
  QBERT_AVX512 static int32_t corr(const int8_t* a, int64_t len) { return avx512::row_corr(a, len); }
  QBERT_AVX512 static void dot(int mr, int nr, const int8_t* a, int64_t lda, const uint32_t* panel, int64_t quads,
                               const int32_t* corr, int32_t* acc) {
    // The micro-kernel's int32 epilogue subtracts corr and stores the tile to acc [mr][kNr].
    Epilogue e;
    e.corr = corr;
    e.out = acc;
    e.out_kind = OutKind::kI32;
    e.ldo = kNr;
    alignas(64) int32_t ragged[kMr * kNr];  // the micro-kernel's staging for a tile with nr < kNr
    avx512::micro_kernel_rows(mr, a, lda, reinterpret_cast<const uint8_t*>(panel), quads, e, 0, 0, nr, ragged);
  }
  static void masks(int nr, __mmask16 (&mask)[kVecs]) {
    for (int v = 0; v < kVecs; ++v) {
      const int rest = std::clamp(nr - v * kLanes, 0, kLanes);
      mask[v] = rest == kLanes ? kAllLanes : static_cast<__mmask16>((1u << rest) - 1);
    }
  }
  QBERT_AVX512 static void accumulate(int mr, int nr, const int32_t* acc, const float* scale, float* y) {
    __mmask16 mask[kVecs];
    masks(nr, mask);
    for (int v = 0; v < kVecs; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(mask[v], scale + v * kLanes);
      for (int r = 0; r < mr; ++r) {
        float* yr = y + r * kNr + v * kLanes;
        __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask[v], acc + r * kNr + v * kLanes)), s);
        QBERT_NO_CONTRACT(p);
        _mm512_store_ps(yr, _mm512_add_ps(_mm512_load_ps(yr), p));
      }
    }
  }
  QBERT_AVX512 static void finish(int mr, int nr, const float* y, const float* x_scale, const float* bias, float* out,
                                  int64_t ldo) {
    __mmask16 mask[kVecs];
    masks(nr, mask);
    for (int r = 0; r < mr; ++r) {
      const __m512 xs = _mm512_set1_ps(x_scale[r]);
      for (int v = 0; v < kVecs; ++v) {
        __m512 t = _mm512_mul_ps(_mm512_load_ps(y + r * kNr + v * kLanes), xs);
        QBERT_NO_CONTRACT(t);
        if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask[v], bias + v * kLanes));
        _mm512_mask_storeu_ps(out + r * ldo + v * kLanes, mask[v], t);
      }
    }
  }
};

struct AvxVnni {
  static constexpr int kMr = avx2::kMr, kNr = avx2::kNr;

  template <int BITS>
  QBERT_LOWBIT_AVX2 static void pack(const int32_t* chunk, int64_t ldw, int nr, const uint8_t* zero, uint32_t* dst) {
    lowbit::vnni_chunk<BITS>(chunk, ldw, nr, zero, dst, kNr);
  }
  QBERT_AVXVNNI static int32_t corr(const int8_t* a, int64_t len) { return avx2::vnni_row_corr(a, len); }
  QBERT_AVXVNNI static void dot(int mr, int, const int8_t* a, int64_t lda, const uint32_t* panel, int64_t quads,
                                const int32_t* corr, int32_t* acc) {
    avx2::vnni_micro_kernel_rows(mr, a, lda, reinterpret_cast<const uint8_t*>(panel), quads, acc);
    subtract_corr_plain<kNr>(mr, corr, acc);
  }
  QBERT_LOWBIT_AVX2 static void accumulate(int mr, int nr, const int32_t* acc, const float* scale, float* y) {
    accumulate_plain<kNr>(mr, nr, acc, scale, y);
  }
  QBERT_LOWBIT_AVX2 static void finish(int mr, int nr, const float* y, const float* x_scale, const float* bias,
                                       float* out, int64_t ldo) {
    finish_plain<kNr>(mr, nr, y, x_scale, bias, out, ldo);
  }
};

struct Avx2 {  // gemm_avx2.h's vpmaddwd kernel wants int16 pairs; the VNNI format in plain loops is simpler
  static constexpr int kMr = avx2::kMr, kNr = avx2::kNr;

  template <int BITS>
  QBERT_LOWBIT_AVX2 static void pack(const int32_t* chunk, int64_t ldw, int nr, const uint8_t* zero, uint32_t* dst) {
    lowbit::vnni_chunk<BITS>(chunk, ldw, nr, zero, dst, kNr);
  }
  QBERT_LOWBIT_AVX2 static int32_t corr(const int8_t* a, int64_t len) { return corr_plain(a, len); }
  QBERT_LOWBIT_AVX2 static void dot(int mr, int, const int8_t* a, int64_t lda, const uint32_t* panel, int64_t quads,
                                    const int32_t* corr, int32_t* acc) {
    dot_plain<kNr>(mr, a, lda, panel, quads, corr, acc);
  }
  QBERT_LOWBIT_AVX2 static void accumulate(int mr, int nr, const int32_t* acc, const float* scale, float* y) {
    accumulate_plain<kNr>(mr, nr, acc, scale, y);
  }
  QBERT_LOWBIT_AVX2 static void finish(int mr, int nr, const float* y, const float* x_scale, const float* bias,
                                       float* out, int64_t ldo) {
    finish_plain<kNr>(mr, nr, y, x_scale, bias, out, ldo);
  }
};

struct Scalar {  // baseline x86-64 (SSE2): the path for any CPU
  static constexpr int kMr = avx2::kMr, kNr = avx2::kNr;

  template <int BITS>
  static void pack(const int32_t* chunk, int64_t ldw, int nr, const uint8_t* zero, uint32_t* dst) {
    lowbit::vnni_chunk<BITS>(chunk, ldw, nr, zero, dst, kNr);
  }
  static int32_t corr(const int8_t* a, int64_t len) { return corr_plain(a, len); }
  static void dot(int mr, int, const int8_t* a, int64_t lda, const uint32_t* panel, int64_t quads,
                  const int32_t* corr, int32_t* acc) {
    dot_plain<kNr>(mr, a, lda, panel, quads, corr, acc);
  }
  static void accumulate(int mr, int nr, const int32_t* acc, const float* scale, float* y) {
    accumulate_plain<kNr>(mr, nr, acc, scale, y);
  }
  static void finish(int mr, int nr, const float* y, const float* x_scale, const float* bias, float* out,
                     int64_t ldo) {
    finish_plain<kNr>(mr, nr, y, x_scale, bias, out, ldo);
  }
};

// Rows x K per parallel task of the O(M K) corrections, so a task outweighs its scheduling.
constexpr int64_t kMinCorrElemsPerTask = 16384;

template <class P>
void compute_corr(const Problem& p, int32_t* corr) {
  parallel_for(0, p.M, std::max<int64_t>(1, kMinCorrElemsPerTask / p.K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t k0 = g * p.group_size, k1 = std::min(p.K, k0 + p.group_size);
        corr[g * p.M + m] = P::corr(p.a + m * p.lda + k0, k1 - k0);
      }
  });
}

template <int BITS, class P>
void run(const Problem& p) {
  const int64_t chunks = lowbit::chunks(p.K);
  parallel_for(0, ceil_div(p.N, P::kNr), 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<uint32_t> panel;  // [chunks * 8 quads][kNr]: kept between calls
    panel.resize(std::max<size_t>(panel.size(), chunks * kQuadsPerChunk * P::kNr));
    alignas(64) int32_t acc[P::kMr * P::kNr];
    alignas(64) float y[P::kMr * P::kNr];
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t n0 = pi * P::kNr;
      const int nr = static_cast<int>(std::min<int64_t>(P::kNr, p.N - n0));
      for (int64_t c = 0; c < chunks; ++c)
        P::template pack<BITS>(p.w + c * BITS * p.N + n0, p.N, nr, p.zeros + (c * kPackChunk / p.group_size) * p.N + n0,
                               panel.data() + c * kQuadsPerChunk * P::kNr);
      for (int64_t m0 = 0; m0 < p.M; m0 += P::kMr) {
        const int mr = static_cast<int>(std::min<int64_t>(P::kMr, p.M - m0));
        std::fill(y, y + P::kMr * P::kNr, 0.0f);
        for (int64_t g = 0; g < p.groups; ++g) {
          // A group starts on a chunk (group_size is a multiple of 32, or there is one group).
          const int64_t k0 = g * p.group_size, k1 = std::min(p.K, k0 + p.group_size);
          P::dot(mr, nr, p.a + m0 * p.lda + k0, p.lda, panel.data() + k0 / kQuad * P::kNr, ceil_div(k1 - k0, kQuad),
                 p.corr + g * p.M + m0, acc);
          P::accumulate(mr, nr, acc, p.scales + g * p.N + n0, y);
        }
        P::finish(mr, nr, y, p.x_scale + m0, p.bias ? p.bias + n0 : nullptr, p.out + m0 * p.N + n0, p.N);
      }
    }
  });
}

template <class P>
void run_isa(const char* op, int bits, Problem& p, int32_t* corr) {
  compute_corr<P>(p, corr);
  p.corr = corr;
  dispatch_bits<W4A8Bits>(bits, [&](auto b) { run<decltype(b)::value, P>(p); },
                          [&] { check_bits<W4A8Bits>(op, bits); });  // check_operands has admitted only these
}

}  // namespace

at::Tensor w4a8_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "w4a8_linear_cpu";
  const lowbit::Operands o = lowbit::check_operands<W4A8Bits>(op, x, w_packed, scales, zeros, bits, group_size, bias);
  const int64_t top_code = (int64_t{1} << bits) - 1;
  if (zeros.has_value() && zeros->numel() > 0) {
    const int64_t largest = zeros->max().item<int64_t>();
    QBERT_CHECK(largest <= top_code, op, "zero points must be in [0, ", top_code, "] for bits=", bits,
                " (u - zero must fit an int8 operand), got a zero point of ", largest);
  }
  QBERT_CHECK(std::min(group_size, o.K) <= kW4A8MaxGroupK, op, "a K group of min(group_size=", group_size, ", K=",
              o.K, ") elements exceeds ", kW4A8MaxGroupK, ", beyond which its int32 sum can overflow");
  const auto [x_q, x_scale] = quantize_per_token_cpu(x);
  // The micro-kernels read whole quads of k: pad the rows of x_q with zeros (which add nothing).
  const int64_t lda = ceil_div(o.K, kQuad) * kQuad;
  const at::Tensor a = lda == o.K ? x_q : at::constant_pad_nd(x_q, {0, lda - o.K}).contiguous();
  at::Tensor corr = at::empty({o.groups, o.M}, x_q.options().dtype(at::kInt));
  at::Tensor out = at::empty({o.M, o.N}, x_scale.options());
  Problem p{a.data_ptr<int8_t>(), lda, nullptr, x_scale.data_ptr<float>(), w_packed.data_ptr<int32_t>(),
            scales.data_ptr<float>(), o.zeros.data_ptr<uint8_t>(),
            o.bias.defined() ? o.bias.data_ptr<float>() : nullptr,
            out.data_ptr<float>(), o.M, o.N, o.K, group_size, o.groups};
  int32_t* c = corr.data_ptr<int32_t>();
  switch (active_isa()) {
    case Isa::kAmxInt8:  // W4A8 has no tile path: AMX runs its AVX-512 one
    case Isa::kAvx512Vnni: run_isa<Avx512>(op, static_cast<int>(bits), p, c); break;
    case Isa::kAvxVnni: run_isa<AvxVnni>(op, static_cast<int>(bits), p, c); break;
    case Isa::kAvx2: run_isa<Avx2>(op, static_cast<int>(bits), p, c); break;
    case Isa::kScalar: run_isa<Scalar>(op, static_cast<int>(bits), p, c); break;
  }
  return out.to(x.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("w4a8_linear_cpu(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("w4a8_linear_cpu", &w4a8_linear_cpu); }

}  // namespace qbert::cpu
