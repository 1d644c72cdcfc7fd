// Prints the constants of csrc/common/constants.h and what dispatch_bits does with each width from 0 to
// kMaxProbedBits, for tests/cuda/test_nvcc_constants.py to compare with the Python package. Built with
// nvcc, so the header also goes through nvcc's device pass (device_use: compiled, never launched). Not
// part of the build. Output: one "NAME value ..." line per constant.
#include <cstdio>

#include "common/constants.h"

using namespace qbert;

// The header's names in device code (external linkage: nvcc compiles it although nothing launches it).
__global__ void device_use(uint32_t* out) {
  const bool known = LowbitBits::contains(threadIdx.x) && W4A8Bits::contains(threadIdx.x);
  out[threadIdx.x] = byte_mask(kBytesPerWord) + kInt8Qmax + kQuadsPerChunk * kByteOnes + (known ? kPackChunk : 0);
}

namespace {

constexpr int kMaxProbedBits = 9;  // every width from 0 to 9: the known ones and unknown ones on each side
constexpr int kUnknown = -1;       // what on_unknown returns below

template <class Widths>
void print_widths(const char* name) {
  std::printf("%s", name);
  for (int v : Widths::kValues) std::printf(" %d", v);
  std::printf("\n%s_MAX %d\n", name, Widths::kMax);
  // A dispatch that returns a value, as the CUDA launchers use it ...
  std::printf("%s_DISPATCH", name);
  for (int bits = 0; bits <= kMaxProbedBits; ++bits)
    std::printf(" %d", dispatch_bits<Widths>(bits, [](auto b) { return decltype(b)::value; }, [] { return kUnknown; }));
  // ... and one whose f and on_unknown return void, as the CPU kernels use it.
  int dispatched = 0, unknown = 0;
  for (int bits = 0; bits <= kMaxProbedBits; ++bits)
    dispatch_bits<Widths>(bits, [&](auto b) { dispatched += decltype(b)::value; }, [&] { ++unknown; });
  std::printf("\n%s_VOID_DISPATCH %d %d\n", name, dispatched, unknown);
}

}  // namespace

int main() {
  std::printf("INT8_QMAX %d\n", kInt8Qmax);
  std::printf("INT8_GEMM_MAX_K %lld\n", static_cast<long long>(kInt8GemmMaxK));
  std::printf("PACK_CHUNK %d\n", kPackChunk);
  std::printf("BYTES_PER_WORD %d\n", kBytesPerWord);
  std::printf("QUADS_PER_CHUNK %d\n", kQuadsPerChunk);
  std::printf("BYTE_MASK");
  for (int width = 1; width <= 8; width *= 2) std::printf(" %u", byte_mask(width));
  std::printf("\nW4A8_MAX_GROUP_K %lld\n", static_cast<long long>(kW4A8MaxGroupK));
  print_widths<LowbitBits>("BITS_CHOICES");
  print_widths<W4A8Bits>("W4A8_BITS");
  return 0;
}
