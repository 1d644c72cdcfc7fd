// lowbit_linear_cpu: out [M, N] = x @ dequantize(w_packed).T + bias in x's dtype, for 2/3/4/8-bit
// codes. Spec: qbert/ops/lowbit_linear.py::lowbit_linear_reference; layout: qbert/quant/packing.py.
//
// Blocking. The work is split over blocks of kNb = 64 output columns (at::parallel_for hands each
// thread a contiguous run of blocks). For its block a thread walks K in steps of kPanelK = 128: it
// unpacks and dequantizes that step's codes into a float32 panel [128][64] (32 KiB, within Zen 5's
// 48 KiB L1), then sweeps every row of x over the panel, accumulating into the output block (f32).
// The float weight exists one panel at a time, and each panel is reused by all M rows; a panel row
// is a contiguous run of 64 columns because w_packed is stored N-contiguous.
//
// Micro-kernel (AVX-512): a kMr x 64 tile in 6 x 4 = 24 zmm accumulators (+ 4 panel vectors + 1
// broadcast of x: 29 of 32 registers), one FMA per panel element per row. The AVX2 and scalar paths
// run the same blocking with plain loops vectorized for their target (lowbit_unpack.h).
//
// Float order: FMAs along k in stretches of 32 (kSumK), then + bias, then the cast. PyTorch's matmul
// sums in another order, so the contract is the tests' float tier (error vs float64 at most 2x
// PyTorch's), not bit equality.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "cpu/isa.h"
#include "cpu/lowbit_args.h"
#include "cpu/lowbit_unpack.h"

namespace qbert::cpu {
namespace {

using lowbit::kPackChunk;

constexpr int kNb = 64;                             // output columns per block (4 zmm)
constexpr int kPanelK = 4 * kPackChunk;             // k per panel: [128][64] f32 = 32 KiB
constexpr int kMr = 6;                              // rows of x per AVX-512 micro-tile
// Each stretch of kSumK k is summed in fresh accumulators and then added to the output: a two-level
// sum whose rounding error grows with kSumK + K / kSumK rather than K. PyTorch's sgemm blocks its sums
// too, and the float tier compares against it (a plain running sum over K = 768 missed it by 2.7x).
constexpr int kSumK = kPackChunk;
constexpr int kLanes = 16;                          // f32 lanes per zmm
constexpr int kVecs = kNb / kLanes;                 // 4
constexpr __mmask16 kAllLanes = 0xFFFF;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Problem {
  const float* x;         // [M, K] f32
  const int32_t* w;       // w_packed [ceil(K/32)*bits, N]
  const float* scales;    // [groups, N]
  const uint8_t* zeros;   // [groups, N]
  const float* bias;      // [N] f32, or null
  float* out;             // [M, N] f32
  int64_t M, N, K, group_size;
};

// ---- plain-loop bodies, vectorized by the compiler for the target of their wrapper ------------------
// out[m][0, nb) (+)= x[m][0, kc) @ panel[0, kc)[0, nb) for every row m (out row stride ldo), summed in
// stretches of kSumK (see kSumK).
QBERT_ALWAYS_INLINE void sweep_plain(const float* x, int64_t ldx, int64_t M, int kc, const float* panel, float* out,
                                     int64_t ldo, int nb, bool first) {
  for (int64_t m = 0; m < M; ++m)
    for (int k0 = 0; k0 < kc; k0 += kSumK) {
      float acc[kNb] = {};
      for (int k = k0; k < std::min(kc, k0 + kSumK); ++k) {
        const float xv = x[m * ldx + k];
        for (int j = 0; j < kNb; ++j) acc[j] += xv * panel[k * kNb + j];
      }
      float* o = out + m * ldo;
      for (int j = 0; j < nb; ++j) o[j] = first && k0 == 0 ? acc[j] : o[j] + acc[j];
    }
}

QBERT_ALWAYS_INLINE void add_bias_plain(float* out, int64_t ldo, int64_t M, int nb, const float* bias) {
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < nb; ++j) out[m * ldo + j] += bias[j];
}

// ---- AVX-512 micro-kernel ----------------------------------------------------------------------------
template <int MR>
QBERT_LOWBIT_AVX512 void sweep_tile(const float* x, int64_t ldx, int kc, const float* panel, float* out, int64_t ldo,
                                    const __mmask16 (&mask)[kVecs], bool first) {
  for (int k0 = 0; k0 < kc; k0 += kSumK) {
    __m512 acc[MR][kVecs];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int k = k0; k < std::min(kc, k0 + kSumK); ++k) {
      __m512 w[kVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) w[v] = _mm512_load_ps(panel + k * kNb + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(xv, w[v], acc[r][v]);
      }
    }
    const bool overwrite = first && k0 == 0;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        float* o = out + r * ldo + v * kLanes;
        const __m512 sum = overwrite ? acc[r][v] : _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], o), acc[r][v]);
        _mm512_mask_storeu_ps(o, mask[v], sum);
      }
  }
}

// Dispatches the row count of the last, ragged micro-tile (mr <= kMr) to its unrolled kernel.
template <int MR = kMr>
QBERT_LOWBIT_AVX512 void sweep_rows(int mr, const float* x, int64_t ldx, int kc, const float* panel, float* out,
                                    int64_t ldo, const __mmask16 (&mask)[kVecs], bool first) {
  if constexpr (MR > 1) {
    if (mr < MR) return sweep_rows<MR - 1>(mr, x, ldx, kc, panel, out, ldo, mask, first);
  }
  sweep_tile<MR>(x, ldx, kc, panel, out, ldo, mask, first);
}

// ---- one policy per ISA: the three steps of a block -------------------------------------------------
struct Avx512 {
  template <int BITS>
  QBERT_LOWBIT_AVX512 static void dequantize(const int32_t* chunk, int64_t ldw, int nb, const float* scale,
                                             const uint8_t* zero, float* panel) {
    lowbit::dequantize_chunk<BITS>(chunk, ldw, nb, scale, zero, panel, kNb);
  }
  QBERT_LOWBIT_AVX512 static void sweep(const float* x, int64_t ldx, int64_t M, int kc, const float* panel, float* out,
                                        int64_t ldo, int nb, bool first) {
    __mmask16 mask[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      const int rest = std::clamp(nb - v * kLanes, 0, kLanes);
      mask[v] = rest == kLanes ? kAllLanes : static_cast<__mmask16>((1u << rest) - 1);
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMr)
      sweep_rows(static_cast<int>(std::min<int64_t>(kMr, M - m0)), x + m0 * ldx, ldx, kc, panel, out + m0 * ldo, ldo,
                 mask, first);
  }
  QBERT_LOWBIT_AVX512 static void add_bias(float* out, int64_t ldo, int64_t M, int nb, const float* bias) {
    add_bias_plain(out, ldo, M, nb, bias);
  }
};

struct Avx2 {  // also the AVX-VNNI path: VNNI adds nothing to float arithmetic
  template <int BITS>
  QBERT_LOWBIT_AVX2 static void dequantize(const int32_t* chunk, int64_t ldw, int nb, const float* scale,
                                           const uint8_t* zero, float* panel) {
    lowbit::dequantize_chunk<BITS>(chunk, ldw, nb, scale, zero, panel, kNb);
  }
  QBERT_LOWBIT_AVX2 static void sweep(const float* x, int64_t ldx, int64_t M, int kc, const float* panel, float* out,
                                      int64_t ldo, int nb, bool first) {
    sweep_plain(x, ldx, M, kc, panel, out, ldo, nb, first);
  }
  QBERT_LOWBIT_AVX2 static void add_bias(float* out, int64_t ldo, int64_t M, int nb, const float* bias) {
    add_bias_plain(out, ldo, M, nb, bias);
  }
};

struct Scalar {  // baseline x86-64 (SSE2): the path for any CPU
  template <int BITS>
  static void dequantize(const int32_t* chunk, int64_t ldw, int nb, const float* scale, const uint8_t* zero,
                         float* panel) {
    lowbit::dequantize_chunk<BITS>(chunk, ldw, nb, scale, zero, panel, kNb);
  }
  static void sweep(const float* x, int64_t ldx, int64_t M, int kc, const float* panel, float* out, int64_t ldo,
                    int nb, bool first) {
    sweep_plain(x, ldx, M, kc, panel, out, ldo, nb, first);
  }
  static void add_bias(float* out, int64_t ldo, int64_t M, int nb, const float* bias) {
    add_bias_plain(out, ldo, M, nb, bias);
  }
};

template <int BITS, class P>
void run(const Problem& p) {
  at::parallel_for(0, ceil_div(p.N, kNb), 1, [&](int64_t b0, int64_t b1) {
    // Zeroed once so that the columns a ragged block leaves unwritten (past its nb) hold finite values;
    // they are computed on, and discarded.
    alignas(64) float panel[kPanelK * kNb] = {};
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kNb;
      const int nb = static_cast<int>(std::min<int64_t>(kNb, p.N - n0));
      for (int64_t k0 = 0; k0 < p.K; k0 += kPanelK) {
        const int kc = static_cast<int>(std::min<int64_t>(kPanelK, p.K - k0));
        for (int64_t c = k0 / kPackChunk; c * kPackChunk < k0 + kc; ++c) {
          const int64_t at = (c * kPackChunk / p.group_size) * p.N + n0;  // the chunk's K group, column n0
          P::template dequantize<BITS>(p.w + c * BITS * p.N + n0, p.N, nb, p.scales + at, p.zeros + at,
                                       panel + (c * kPackChunk - k0) * kNb);
        }
        P::sweep(p.x + k0, p.K, p.M, kc, panel, p.out + n0, p.N, nb, k0 == 0);
      }
      if (p.bias) P::add_bias(p.out + n0, p.N, p.M, nb, p.bias + n0);
    }
  });
}

}  // namespace

at::Tensor lowbit_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lowbit_linear_cpu";
  const lowbit::Operands o =
      lowbit::check_operands(op, x, w_packed, scales, zeros, bits, group_size, bias, {2, 3, 4, 8});
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // the rows of x in float32, converted once
  at::Tensor out = at::empty({o.M, o.N}, xf.options());
  const Problem p{xf.data_ptr<float>(), w_packed.data_ptr<int32_t>(), scales.data_ptr<float>(),
                  o.zeros.data_ptr<uint8_t>(), o.bias.defined() ? o.bias.data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), o.M, o.N, o.K, group_size};
  const Isa isa = active_isa();
  lowbit::with_bits<2, 3, 4, 8>(static_cast<int>(bits), [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    switch (isa) {
      case Isa::kAvx512Vnni: return run<BITS, Avx512>(p);
      case Isa::kAvxVnni:
      case Isa::kAvx2: return run<BITS, Avx2>(p);
      case Isa::kScalar: return run<BITS, Scalar>(p);
    }
  });
  return out.to(x.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("lowbit_linear_cpu(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("lowbit_linear_cpu", &lowbit_linear_cpu); }

}  // namespace qbert::cpu
