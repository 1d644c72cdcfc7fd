// The numbers that csrc/cpu and csrc/cuda share, each stated once beside the Python constant it mirrors
// (qbert/quant and qbert/ops state them for the package; tests/cuda/test_nvcc_constants.py checks that the
// two agree), and the one static switch over bit widths. Torch-free and CUDA-free: plain C++17 constexpr
// scalars, types and functions, so g++ (csrc/cpu) and nvcc's host and device passes (csrc/cuda) read the
// same header.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define QBERT_HOST_DEVICE __host__ __device__
#else
#define QBERT_HOST_DEVICE
#endif

namespace qbert {

// ---- int8 ------------------------------------------------------------------------------------------

// qbert.quant.int8.INT8_QMAX: symmetric int8 codes lie in [-127, 127] (-128 is never produced). 127 is
// the clamp of every quantizer and the divisor of a per-token scale, amax / 127.
inline constexpr int kInt8Qmax = 127;
// The largest magnitude an int8 operand can have, |-128| (qbert/quant/int8.py's _INT8_ABS_MAX): the
// int8 GEMMs accept -128 although no quantizer writes it.
inline constexpr int kInt8AbsMax = 128;
// qbert.quant.int8.INT8_GEMM_MAX_K (131071): the largest K for which an int8 x int8 dot product is exact
// in int32 whatever the codes, K * 128 * 128 <= 2^31 - 1. Past it the accumulators can wrap.
inline constexpr int64_t kInt8GemmMaxK =
    std::numeric_limits<int32_t>::max() / (int64_t{kInt8AbsMax} * kInt8AbsMax);

// ---- packed low-bit codes (the layout is stated in qbert/quant/packing.py) --------------------------

// qbert.quant.packing.PACK_CHUNK: K is cut into chunks of 32 codes; a chunk of b-bit codes is b int32
// words. A chunk never straddles two K groups: group_size is a multiple of it, or at least K.
inline constexpr int kPackChunk = 32;
// qbert.quant.packing.BYTES_PER_WORD: one shift and mask of a slice word yields four consecutive codes,
// one in each byte (a "quad").
inline constexpr int kBytesPerWord = 4;
inline constexpr int kQuadsPerChunk = kPackChunk / kBytesPerWord;  // 8 quads of 4 codes per chunk
inline constexpr uint32_t kByteOnes = 0x01010101u;  // 1 in each byte of a word: v * kByteOnes repeats byte v

// qbert.quant.packing.byte_mask: ((1 << width) - 1) in each byte of a word.
QBERT_HOST_DEVICE constexpr uint32_t byte_mask(int width) { return ((1u << width) - 1u) * kByteOnes; }

// ---- bit widths ------------------------------------------------------------------------------------

namespace detail {
template <int... kBits>
constexpr int widest() {
  int w = 0;
  ((w = kBits > w ? kBits : w), ...);
  return w;
}
}  // namespace detail

// A set of weight bit widths, as a type: what an op's argument check admits (contains), the largest
// width (kMax), and the instantiations of dispatch_bits.
template <int... kBits>
struct BitWidths {
  static constexpr int kValues[sizeof...(kBits)] = {kBits...};
  static constexpr int kMax = detail::widest<kBits...>();
  QBERT_HOST_DEVICE static constexpr bool contains(int64_t bits) { return ((bits == kBits) || ...); }
};

// qbert.quant.packing.BITS_CHOICES: the widths of packed codes, and those lowbit_linear takes.
using LowbitBits = BitWidths<2, 3, 4, 8>;
// qbert.ops.w4a8_linear.W4A8_BITS: the widths w4a8_linear takes, those whose u - zero fits an int8 operand.
using W4A8Bits = BitWidths<2, 3, 4>;

// qbert.ops.w4a8_linear.W4A8_MAX_GROUP_K (1127288): |x_q| <= 127 and |u - zero| <= 2^4 - 1, so the int32
// sum of a K group is exact while the group has at most INT32_MAX / (127 * 15) elements.
inline constexpr int64_t kW4A8MaxGroupK =
    std::numeric_limits<int32_t>::max() / (int64_t{kInt8Qmax} * ((int64_t{1} << W4A8Bits::kMax) - 1));

namespace detail {

template <int... kBits>
struct DispatchBits;

template <>
struct DispatchBits<> {
  template <class F, class Otherwise>
  static decltype(auto) run(int, F&, Otherwise& on_unknown) {
    return on_unknown();
  }
};

template <int kFirst, int... kRest>
struct DispatchBits<kFirst, kRest...> {
  template <class F, class Otherwise>
  static decltype(auto) run(int bits, F& f, Otherwise& on_unknown) {
    if (bits == kFirst) return f(std::integral_constant<int, kFirst>{});
    return DispatchBits<kRest...>::run(bits, f, on_unknown);
  }
};

template <class Widths>
struct DispatchOf;

template <int... kBits>
struct DispatchOf<BitWidths<kBits...>> {
  using type = DispatchBits<kBits...>;
};

}  // namespace detail

// The static switch from a runtime bit width to a template argument, so that one templated kernel covers
// every width (never a copy of a kernel per width). Returns f(std::integral_constant<int, BITS>{}) for
// the BITS of Widths equal to `bits`, else on_unknown() (which returns what f returns, void included):
//
//   return dispatch_bits<LowbitBits>(bits, [&](auto bits_c) {
//     constexpr int BITS = decltype(bits_c)::value;
//     return launch<BITS>(...);
//   }, [] { return cudaErrorInvalidValue; });
template <class Widths, class F, class Otherwise>
decltype(auto) dispatch_bits(int bits, F&& f, Otherwise&& on_unknown) {
  return detail::DispatchOf<Widths>::type::run(bits, f, on_unknown);
}

}  // namespace qbert
