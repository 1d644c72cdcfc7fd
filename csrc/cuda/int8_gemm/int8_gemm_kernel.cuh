// The int8 GEMM family's plan and launch: which kernel and tile config runs a shape on a device, how
// many persistent CTAs, and the dispatch to int8_gemm_sm80.cuh / int8_gemm_sm90.cuh. Torch-free; the
// torch-facing launcher is int8_gemm.cu. plan_int8_gemm is a pure host function.
//
// Kernels:
//   kSm80SmallM  M <= 32 (pooler, classifier: M = batch): 16-row tiles, warps split K.
//   kSm80Medium  64 x 64 tiles: mid-size GEMMs, where 128 x 128 tiles would leave SMs idle.
//   kSm80Large   128 x 128 tiles: many tokens on cc 8.x, and on H100 when the wgmma tiles are too few.
//   kSm90Wgmma   cc 9.0 (sm_90a): the wgmma kernel.
// Between the last three the plan picks the least estimated time (see estimated_cost).
//
// kS8 (per-token requantization) makes the n_tiles CTAs of a row block wait for each other, so they
// must all be resident at once: the grid is a multiple of n_tiles and at most the co-resident CTA count
// (a lower bound computed from the device's shared memory and threads per SM, which the launcher reads
// from the device, and the kernel's __launch_bounds__), and the launch is cooperative, so the driver
// itself refuses a grid that cannot be resident at once (see launch_persistent in int8_epilogue.cuh).
#pragma once

#include <cuda_runtime.h>

#include "cuda/int8_gemm/int8_epilogue.cuh"
#include "cuda/int8_gemm/int8_gemm_sm80.cuh"
#include "cuda/int8_gemm/int8_gemm_sm90.cuh"

namespace qbert::cuda::int8 {

// What the plan needs to know of the device; int8_gemm.cu reads each field with cudaDeviceGetAttribute.
struct DeviceInfo {
  int sm_count;               // cudaDevAttrMultiProcessorCount
  int cc_major, cc_minor;     // cudaDevAttrComputeCapabilityMajor / Minor
  int smem_per_sm;            // cudaDevAttrMaxSharedMemoryPerMultiprocessor, bytes
  int smem_reserved_per_cta;  // cudaDevAttrReservedSharedMemoryPerBlock: what the driver keeps per resident CTA
  int threads_per_sm;         // cudaDevAttrMaxThreadsPerMultiProcessor
};

enum class Kernel : int { kSm80SmallM, kSm80Medium, kSm80Large, kSm90Wgmma };

enum class PlanStatus : int {
  kOk,
  kUnsupportedDevice,  // not cc 8.x or 9.0
  kRowTooWide,         // kS8: no kernel fits a row block's n_tiles CTAs on the device at once
};

struct Plan {
  PlanStatus status;
  Kernel kernel;
  int block_m, block_n;
  int m_tiles, n_tiles;
  int grid;         // persistent CTAs (0 unless status == kOk)
  int ctas_per_sm;  // co-resident CTAs per SM the grid counts on (a lower bound; kS8 needs it)
  int coresident;   // sm_count * ctas_per_sm
};

// Whether this build has sm_90a machine code for the wgmma kernel: setup.py defines QBERT_SM90A when
// QBERT_CUDA_ARCHS lists 9.0a. Without it the kernel's body on a cc 9.0 device would be the trap of
// int8_gemm_sm90.cuh's guard, so the plan runs the sm_80 kernels there instead.
#ifdef QBERT_SM90A
inline constexpr bool kWgmmaBuilt = true;
#else
inline constexpr bool kWgmmaBuilt = false;
#endif

// M up to which kSm80SmallM runs: a classifier / pooler GEMM has M = batch, and two 16-row blocks still
// read each weight tile from L2 rather than HBM the second time.
inline constexpr int kSmallMMax = 32;

// The smallest opt-in shared memory per CTA of any device the sm_80 kernels run on (cc 8.6 / 8.9; CUDA C++
// Programming Guide, "Technical Specifications per Compute Capability"). A compile-time bound, not a
// device query: the tile configs are template arguments, so that they fit every cc 8.x device is checked
// when they are compiled (sm80_candidate). The plan's per-SM numbers come from DeviceInfo.
inline constexpr int kMaxSmemPerCtaCc86 = 99 * 1024;

// Relative throughput of one busy SM running each kernel, for choosing between them. Estimates from the
// tile shapes, to be refined with benchmarks/ measurements: a 128 x 128 tile feeds each ldmatrix'd
// fragment to 4 MMAs, a 64 x 64 tile to 2 (more shared-memory traffic per MMA); on H100 wgmma reaches
// about twice the int8 rate of mma.sync.
inline constexpr double kRateLarge = 1.0;
inline constexpr double kRateMedium = 0.8;
inline constexpr double kRateWgmma = 2.0;

namespace plan_detail {

struct Candidate {
  Kernel kernel;
  int block_m, block_n, threads, smem_bytes;
  int min_ctas_per_sm;  // the kernel's __launch_bounds__ minimum: registers never allow fewer
  double rate;
};

template <class Cfg>
constexpr Candidate sm80_candidate(Kernel kernel, double rate) {
  static_assert(Cfg::kSmemBytes <= kMaxSmemPerCtaCc86, "an sm_80 config must fit every cc 8.x device");
  return {kernel, Cfg::BLOCK_M, Cfg::BLOCK_N, Cfg::kThreads, Cfg::kSmemBytes, Cfg::kMinCtasPerSm, rate};
}

// sm90::int8_gemm_wgmma_kernel's __launch_bounds__(kThreads, 1).
inline constexpr int kWgmmaMinCtasPerSm = 1;

// CTAs that can be resident on one SM at once, at least: the device's shared-memory and thread limits,
// and the __launch_bounds__ minimum (registers may allow more; the estimate stays a lower bound).
inline int ctas_per_sm(const Candidate& c, const DeviceInfo& dev) {
  const int by_smem = dev.smem_per_sm / (c.smem_bytes + dev.smem_reserved_per_cta);
  const int by_threads = dev.threads_per_sm / c.threads;
  const int fit = by_smem < by_threads ? by_smem : by_threads;
  return fit < c.min_ctas_per_sm ? fit : c.min_ctas_per_sm;
}

// Estimated time, in units of tile area over rate: the busiest SM runs ceil(tiles / sm_count) tiles
// (co-resident CTAs share its tensor cores, so concurrency does not shorten that).
inline double estimated_cost(const Candidate& c, int M, int N, int sm_count) {
  const long long tiles = static_cast<long long>(ceil_div(M, c.block_m)) * ceil_div(N, c.block_n);
  const long long per_sm = (tiles + sm_count - 1) / sm_count;
  return static_cast<double>(per_sm) * c.block_m * c.block_n / c.rate;
}

inline Plan make_plan(const Candidate& c, int M, int N, OutKind kind, const DeviceInfo& dev) {
  Plan plan{};
  plan.kernel = c.kernel;
  plan.block_m = c.block_m, plan.block_n = c.block_n;
  plan.m_tiles = ceil_div(M, c.block_m), plan.n_tiles = ceil_div(N, c.block_n);
  plan.ctas_per_sm = ctas_per_sm(c, dev);
  plan.coresident = dev.sm_count * plan.ctas_per_sm;
  const int tiles = plan.m_tiles * plan.n_tiles;
  // kS8: whole row blocks per persistent iteration (a multiple of n_tiles), all resident at once.
  const int slots = kind == OutKind::kS8 ? plan.coresident / plan.n_tiles * plan.n_tiles : plan.coresident;
  plan.grid = tiles < slots ? tiles : slots;
  plan.status = plan.grid >= 1 ? PlanStatus::kOk : PlanStatus::kRowTooWide;
  if (plan.status != PlanStatus::kOk) plan.grid = 0;
  return plan;
}

}  // namespace plan_detail

// Which kernel runs out[M, N] = a[M, K] . b[N, K]^T (+ epilogue `kind`) on `dev`, and with how many
// persistent CTAs. M, N >= 1. K does not change the choice: every candidate's time scales with it.
inline Plan plan_int8_gemm(int M, int N, int K, OutKind kind, const DeviceInfo& dev) {
  using namespace plan_detail;
  static_cast<void>(K);
  Plan best{};
  best.status = PlanStatus::kUnsupportedDevice;
  const bool cc8 = dev.cc_major == 8, cc90 = dev.cc_major == 9 && dev.cc_minor == 0;
  if (!cc8 && !cc90) return best;

  Candidate candidates[3];
  int count = 0;
  if (M <= kSmallMMax) {
    // The only candidate at this M, so its rate never decides anything.
    candidates[count++] = sm80_candidate<sm80::SmallMConfig>(Kernel::kSm80SmallM, kRateMedium);
  } else {
    if (cc90 && kWgmmaBuilt)
      candidates[count++] = {Kernel::kSm90Wgmma, sm90::kBlockM, sm90::kBlockN, sm90::kThreads, sm90::kSmemBytes,
                             kWgmmaMinCtasPerSm, kRateWgmma};
    candidates[count++] = sm80_candidate<sm80::LargeConfig>(Kernel::kSm80Large, kRateLarge);
    candidates[count++] = sm80_candidate<sm80::MediumConfig>(Kernel::kSm80Medium, kRateMedium);
  }
  // The cheapest candidate that can run; ties go to the earlier (bigger-tile) one. If none can (kS8 rows
  // too wide for every kernel), the plan of the last candidate tried says why, with its numbers.
  double best_cost = 0.0;
  for (int i = 0; i < count; ++i) {
    const Plan plan = make_plan(candidates[i], M, N, kind, dev);
    const double cost = estimated_cost(candidates[i], M, N, dev.sm_count);
    if (plan.status == PlanStatus::kOk && (best.status != PlanStatus::kOk || cost < best_cost)) {
      best = plan;
      best_cost = cost;
    } else if (best.status != PlanStatus::kOk) {
      best = plan;
    }
  }
  return best;
}

// Runs `plan` (status kOk) on `stream`. kS8 needs p.row_block_arrivals zeroed and p.amax_partial sized
// [M, plan.n_tiles]. Errors: cudaErrorInvalidValue for a plan that is not kOk;
// cudaErrorCooperativeLaunchTooLarge when kS8's CTAs cannot all be resident at once (the device holds
// fewer than plan.ctas_per_sm per SM: the requant wait could never end, so the driver refuses it).
template <OutKind kOut, Act kAct>
cudaError_t launch_int8_gemm(const GemmParams& p, const Plan& plan, cudaStream_t stream) {
  if (plan.status != PlanStatus::kOk || plan.grid < 1) return cudaErrorInvalidValue;
  switch (plan.kernel) {
    case Kernel::kSm80SmallM: return sm80::launch<sm80::SmallMConfig, kOut, kAct>(p, plan.grid, stream);
    case Kernel::kSm80Medium: return sm80::launch<sm80::MediumConfig, kOut, kAct>(p, plan.grid, stream);
    case Kernel::kSm80Large: return sm80::launch<sm80::LargeConfig, kOut, kAct>(p, plan.grid, stream);
    case Kernel::kSm90Wgmma: return sm90::launch<kOut, kAct>(p, plan.grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qbert::cuda::int8
