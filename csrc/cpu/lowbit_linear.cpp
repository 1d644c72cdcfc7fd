// lowbit_linear_cpu: out [M, N] = x @ dequantize(w_packed).T + bias in x's dtype, for 2/3/4/8-bit
// codes. Spec: qbert/ops/lowbit_linear.py::lowbit_linear_reference; layout: qbert/quant/packing.py.
//
// Two paths, chosen by M (kDirectMaxM). Both split the work over blocks of output columns
// (parallel_for, cpu/parallel.h, hands each thread a contiguous run of blocks).
//
// Direct path (small M): no float weight is ever stored. For each chunk of 32 k, one vector load gives
// the words of 16 (AVX-512) columns; shift and mask in registers give their codes, an OR into 2^23's
// bit pattern and a subtraction give u - z as floats, and FMAs with the broadcast x[m, k] sum them into
// per-row accumulators; the chunk's sum is then scaled once. At M = 1 the weight bytes are the traffic,
// 4-8x fewer than fp32's, where writing and re-reading panels made the panel path 8x slower than fp32.
//
// Panel path. Blocks of kNb = 64 output columns. For its block a thread walks K in steps of
// kPanelK = 128: it unpacks and dequantizes that step's codes into a float32 panel [128][64] (32 KiB, within Zen 5's
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
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/isa.h"
#include "cpu/lowbit_args.h"
#include "cpu/lowbit_unpack.h"
#include "cpu/parallel.h"

namespace qbert::cpu {
namespace {

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
// The largest M served by the direct path (run_direct); larger M take the panel path (run_panels), which
// dequantizes each weight once for all rows. Measured on Zen 5 (AVX-512, 1 thread, 768x768 4-bit g128,
// µs, direct vs panels): M 16: 117 vs 326, M 64: 471 vs 552, M 96: 716 vs 751, M 128: 939 vs 861.
// The direct path decodes the weight again for every tile of rows, so it loses once M is large enough
// to amortize the panels' dequantization; on AVX2 and SSE2 it was faster still at M = 128.
constexpr int kDirectMaxM = 96;

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

// ---- direct path for small M: codes decoded in registers, no panel -----------------------------------
// Written once with GCC vector types; the target of each ISA's wrapper maps them to its registers. (A
// shared body cannot call intrinsics: GCC refuses to inline a target-specific intrinsic into a function
// without that target, even one only ever inlined into such a function.)
template <int kBytes>
struct VecOf {
  typedef float F __attribute__((vector_size(kBytes)));
  typedef uint32_t U __attribute__((vector_size(kBytes)));
  typedef uint8_t B __attribute__((vector_size(kBytes / sizeof(float))));  // one byte per lane
  static constexpr int kLanes = kBytes / sizeof(float);
};

// OR-ed into the bit pattern of the float 2^23, an integer u < 2^23 fills the mantissa: the float is
// 2^23 + u exactly. Taking away 2^23 + z then gives u - z as a float, exactly, in two instructions
// (one vpternlogd that masks and ORs, one subtraction) instead of a mask, a conversion and a subtraction.
constexpr uint32_t kTwoPow23Bits = 0x4B000000u;

// y[r][0, kCols) += x[m0 + r] @ (dequantized columns [n0, n0 + kCols)) for the MR rows of the tile
// (y row stride kCols). Per chunk of 32 k it sums x * (u - z) into fresh accumulators, then adds
// sum * scale to y: the group scale is applied once per chunk (a chunk lies in one K group), and the
// chunk is the same stretch of kSumK as the panel path's, so the error bound is the same.
template <int BITS, class V, int VECS, int MR>
QBERT_ALWAYS_INLINE void direct_tile(const Problem& p, int64_t m0, int64_t n0, int nb, float* y) {
  using F = typename V::F;
  using U = typename V::U;
  using B = typename V::B;
  constexpr int kLanes = V::kLanes, kCols = VECS * kLanes;
  static_assert(kSumK == kPackChunk, "one chunk is one stretch of the two-level sum");
  // Zero-padded copies of a ragged last block's columns and of the last chunk's x: the loads below
  // then never read past N or K, and the padding codes of the last chunk meet x = 0.
  alignas(64) int32_t w_pad[BITS * kCols];
  alignas(64) float scale_pad[kCols];
  uint8_t zero_pad[kCols];
  float x_pad[MR * kPackChunk];
  if (nb < kCols) {
    std::fill_n(w_pad, BITS * kCols, 0);
    std::fill_n(scale_pad, kCols, 0.0f);
    std::fill_n(zero_pad, kCols, 0);
  }
  if (p.K % kPackChunk) std::fill_n(x_pad, MR * kPackChunk, 0.0f);
  for (int64_t c = 0; c < lowbit::chunks(p.K); ++c) {
    const int64_t at = (c * kPackChunk / p.group_size) * p.N + n0;  // the chunk's K group, column n0
    const int32_t* w = p.w + c * BITS * p.N + n0;
    int64_t ldw = p.N;
    const float* scale = p.scales + at;
    const uint8_t* zero = p.zeros + at;
    if (nb < kCols) {
      for (int i = 0; i < BITS; ++i) std::copy_n(w + i * ldw, nb, w_pad + i * kCols);
      std::copy_n(scale, nb, scale_pad);
      std::copy_n(zero, nb, zero_pad);
      w = w_pad, ldw = kCols, scale = scale_pad, zero = zero_pad;
    }
    const float* x = p.x + m0 * p.K + c * kPackChunk;
    int64_t ldx = p.K;
    if (const int64_t kc = p.K - c * kPackChunk; kc < kPackChunk) {
      for (int r = 0; r < MR; ++r) std::copy_n(x + r * ldx, kc, x_pad + r * kPackChunk);
      x = x_pad, ldx = kPackChunk;
    }
    F zero_f[VECS];  // 2^23 + z
#pragma GCC unroll 16
    for (int v = 0; v < VECS; ++v) {
      B z;
      std::memcpy(&z, zero + v * kLanes, sizeof z);
      zero_f[v] = reinterpret_cast<F>(__builtin_convertvector(z, U) | kTwoPow23Bits);
    }
    F acc[MR][VECS] = {};
#pragma GCC unroll 8
    for (int q = 0; q < kQuadsPerChunk; ++q) {
      U codes[VECS];
#pragma GCC unroll 16
      for (int v = 0; v < VECS; ++v) lowbit::load_four_codes<BITS>(w + v * kLanes, ldw, q, codes[v]);
#pragma GCC unroll 4
      for (int t = 0; t < kBytesPerWord; ++t)
#pragma GCC unroll 16
        for (int v = 0; v < VECS; ++v) {
          const U u = (codes[v] >> (lowbit::kByteBits * t)) & lowbit::kLowByte;
          const F w_minus_z = reinterpret_cast<F>(u | kTwoPow23Bits) - zero_f[v];
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) acc[r][v] += x[r * ldx + kBytesPerWord * q + t] * w_minus_z;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < VECS; ++v) {
        F yv, s;
        std::memcpy(&yv, y + r * kCols + v * kLanes, sizeof yv);
        std::memcpy(&s, scale + v * kLanes, sizeof s);
        yv += acc[r][v] * s;
        std::memcpy(y + r * kCols + v * kLanes, &yv, sizeof yv);
      }
  }
}

// Dispatches the row count of the last, ragged tile (mr <= MR) to its unrolled body.
template <int BITS, class V, int VECS, int MR>
QBERT_ALWAYS_INLINE void direct_rows(int mr, const Problem& p, int64_t m0, int64_t n0, int nb, float* y) {
  if constexpr (MR > 1) {
    if (mr < MR) return direct_rows<BITS, V, VECS, MR - 1>(mr, p, m0, n0, nb, y);
  }
  direct_tile<BITS, V, VECS, MR>(p, m0, n0, nb, y);
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
  // Direct path: 4 zmm of columns x up to 4 rows = 16 accumulators, + 4 zero points, 4 code words
  // and the constants: within the 32 zmm registers, so nothing spills.
  using DirectVec = VecOf<64>;
  static constexpr int kDirectVecs = 4, kDirectMr = 4;
  template <int BITS>
  QBERT_LOWBIT_AVX512 static void direct(int mr, const Problem& p, int64_t m0, int64_t n0, int nb, float* y) {
    direct_rows<BITS, DirectVec, kDirectVecs, kDirectMr>(mr, p, m0, n0, nb, y);
  }
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
  // Direct path sized for 16 ymm registers: 2 x 2 accumulators, 2 zero points, 2 code words, constants.
  using DirectVec = VecOf<32>;
  static constexpr int kDirectVecs = 2, kDirectMr = 2;
  template <int BITS>
  QBERT_LOWBIT_AVX2 static void direct(int mr, const Problem& p, int64_t m0, int64_t n0, int nb, float* y) {
    direct_rows<BITS, DirectVec, kDirectVecs, kDirectMr>(mr, p, m0, n0, nb, y);
  }
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
  // Direct path sized for 16 xmm registers, as the AVX2 one.
  using DirectVec = VecOf<16>;
  static constexpr int kDirectVecs = 2, kDirectMr = 2;
  template <int BITS>
  static void direct(int mr, const Problem& p, int64_t m0, int64_t n0, int nb, float* y) {
    direct_rows<BITS, DirectVec, kDirectVecs, kDirectMr>(mr, p, m0, n0, nb, y);
  }
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
void run_direct(const Problem& p) {
  constexpr int kCols = P::kDirectVecs * P::DirectVec::kLanes;
  parallel_for(0, ceil_div(p.N, kCols), 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float y[kDirectMaxM * kCols];  // the block's outputs [M][kCols]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kCols;
      const int nb = static_cast<int>(std::min<int64_t>(kCols, p.N - n0));
      std::fill_n(y, p.M * kCols, 0.0f);
      for (int64_t m0 = 0; m0 < p.M; m0 += P::kDirectMr)
        P::template direct<BITS>(static_cast<int>(std::min<int64_t>(P::kDirectMr, p.M - m0)), p, m0, n0, nb,
                                 y + m0 * kCols);
      for (int64_t m = 0; m < p.M; ++m)
        for (int j = 0; j < nb; ++j)
          p.out[m * p.N + n0 + j] = p.bias ? y[m * kCols + j] + p.bias[n0 + j] : y[m * kCols + j];
    }
  });
}

template <int BITS, class P>
void run_panels(const Problem& p) {
  parallel_for(0, ceil_div(p.N, kNb), 1, [&](int64_t b0, int64_t b1) {
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

template <int BITS, class P>
void run(const Problem& p) {
  if (p.M <= kDirectMaxM) return run_direct<BITS, P>(p);
  run_panels<BITS, P>(p);
}

}  // namespace

at::Tensor lowbit_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lowbit_linear_cpu";
  const lowbit::Operands o = lowbit::check_operands<LowbitBits>(op, x, w_packed, scales, zeros, bits, group_size, bias);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // the rows of x in float32, converted once
  at::Tensor out = at::empty({o.M, o.N}, xf.options());
  const Problem p{xf.data_ptr<float>(), w_packed.data_ptr<int32_t>(), scales.data_ptr<float>(),
                  o.zeros.data_ptr<uint8_t>(), o.bias.defined() ? o.bias.data_ptr<float>() : nullptr,
                  out.data_ptr<float>(), o.M, o.N, o.K, group_size};
  const Isa isa = active_isa();
  dispatch_bits<LowbitBits>(static_cast<int>(bits), [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    switch (isa) {
      case Isa::kAmxInt8:  // the low-bit kernels have no tile path: AMX runs their AVX-512 one
      case Isa::kAvx512Vnni: return run<BITS, Avx512>(p);
      case Isa::kAvxVnni:
      case Isa::kAvx2: return run<BITS, Avx2>(p);
      case Isa::kScalar: return run<BITS, Scalar>(p);
    }
  }, [&] { check_bits<LowbitBits>(op, bits); });  // check_operands has admitted only these widths
  return out.to(x.scalar_type());
}

// For the tests, which cover M on both sides of it.
int64_t lowbit_linear_cpu_max_direct_m() { return kDirectMaxM; }

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("lowbit_linear_cpu_max_direct_m() -> int", &lowbit_linear_cpu_max_direct_m);
  m.def("lowbit_linear_cpu(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("lowbit_linear_cpu", &lowbit_linear_cpu); }

}  // namespace qbert::cpu
