// Runtime choice of the int8 instruction set for the cpu backend. The extension is compiled for
// baseline x86-64; each fast kernel carries its own __attribute__((target(...))) and is only called
// when the running CPU reports every feature that kernel uses (isa_supported), so that one wheel runs
// on any x86-64 machine.
//
// Tests force a lower ISA (force_isa) to exercise every path on one machine; forcing an ISA the CPU
// lacks is refused, because running its instructions would fault with SIGILL.
#pragma once

#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qbert::cpu {

// Ordered from slowest to fastest: detect_isa() returns the highest one the CPU supports.
// kAmxInt8 is AVX512-VNNI plus the AMX tile unit: every AVX-512 kernel runs on it, and the int8 GEMM
// (gemm_amx.h) multiplies on the tiles.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmxInt8 = 4 };
constexpr int kNumIsas = 5;

// Whether the AVX-512 kernels serve `isa` (the AMX ISA includes them).
inline bool has_avx512(Isa isa) { return isa >= Isa::kAvx512Vnni; }

#if defined(__x86_64__) || defined(_M_X64)
namespace detail {
// CPUID leaf 7, sub-leaf 0, EDX: AMX-TILE is bit 24, AMX-INT8 bit 25.
constexpr unsigned kCpuidExtFeatures = 7;
constexpr unsigned kAmxTileBit = 1u << 24;
constexpr unsigned kAmxInt8Bit = 1u << 25;
// Linux keeps the 8 KiB of tile data out of a thread's saved state until the process asks for it once
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without it the first tile instruction faults.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtileData = 18;

inline bool amx_int8_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(kCpuidExtFeatures, 0, &eax, &ebx, &ecx, &edx)) return false;
    if ((edx & (kAmxTileBit | kAmxInt8Bit)) != (kAmxTileBit | kAmxInt8Bit)) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return usable;
}
}  // namespace detail
#endif

// Every feature the kernels of that ISA use, not only the headline one: the AVX2 paths convert
// float16 with F16C, the AVX-512 paths need BW (byte ops, masks on 64 lanes) and VL.
inline bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::kAmxInt8: return isa_supported(Isa::kAvx512Vnni) && detail::amx_int8_usable();
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

inline Isa detect_isa() {
  for (int i = kNumIsas - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kScalar;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmxInt8: return "amx_int8";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvxVnni: return "avx_vnni";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "unknown";
}

// Parses an isa_name(); returns false for an unknown name.
inline bool isa_from_name(const char* name, Isa* out) {
  for (int i = 0; i < kNumIsas; ++i) {
    if (std::strcmp(name, isa_name(static_cast<Isa>(i))) == 0) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

namespace detail {
constexpr int kNoForcedIsa = -1;
inline std::atomic<int>& forced_isa() {
  static std::atomic<int> forced{kNoForcedIsa};
  return forced;
}
}  // namespace detail

// The ISA the kernels use now: the forced one if any, else the best the CPU has.
inline Isa active_isa() {
  const int forced = detail::forced_isa().load(std::memory_order_relaxed);
  return forced == detail::kNoForcedIsa ? detect_isa() : static_cast<Isa>(forced);
}

// Forces `isa` for every later call (the caller checks isa_supported first); reset_isa() undoes it.
inline void force_isa(Isa isa) { detail::forced_isa().store(static_cast<int>(isa)); }
inline void reset_isa() { detail::forced_isa().store(detail::kNoForcedIsa); }

}  // namespace qbert::cpu
