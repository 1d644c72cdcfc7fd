// Host-side checks of csrc/cuda/int8_gemm that need no GPU, built with nvcc and run by
// tests/cuda/test_nvcc_int8_gemm.py. Not part of the build.
//
//   int8_gemm_host_checks fragments
//     For each sm_80 tile config: fills a stage's shared memory with random int8 tiles the way TileLoader
//     does (Swizzle::offset), reads them back with the kernel's own ldmatrix addressing (WarpTile),
//     pushes them through the ldmatrix and mma.m16n8k32 fragment layouts of the PTX ISA (written out
//     below, independently of the kernel), stages the accumulators where the kernel stages them
//     (acc_row / acc_col), adds the K slices and compares with a . b^T exactly. Also checks that every
//     ldmatrix and cp.async phase is free of bank conflicts and that the epilogue's thread layout
//     covers each tile element exactly once. Prints one "ok <config>" line per config.
//   int8_gemm_host_checks plan
//     Reads "M N K kind cc_major cc_minor sm_count smem_per_sm smem_reserved_per_cta threads_per_sm" lines
//     (a DeviceInfo after the shape) from stdin and prints plan_int8_gemm's answer for each: "status kernel
//     block_m block_n m_tiles n_tiles grid ctas_per_sm coresident".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/int8_gemm/int8_gemm_kernel.cuh"

namespace {

using namespace qbert::cuda::int8;

#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      std::fprintf(stderr, __VA_ARGS__);  \
      std::fprintf(stderr, "\n");         \
      std::exit(1);                       \
    }                                     \
  } while (0)

constexpr int kLanes = 32;
constexpr int kMatrices = 4;        // ldmatrix .x4
constexpr int kMatrixRows = 8;      // an 8x8 b16 matrix: 8 rows of 16 bytes
constexpr int kRowBytes = 16;
constexpr int kBankGroups = 8;      // 16-byte groups of banks in one 128-byte shared-memory wavefront
constexpr int kBytesPerReg = 4;

// ldmatrix.sync.aligned.m8n8.x4.b16 (PTX ISA): lanes 8i .. 8i+7 hold the row addresses of matrix i;
// lane 4r + w receives bytes 4w .. 4w+3 of row r of matrix i in its register i.
void ldmatrix_x4(const std::vector<unsigned char>& smem, const int (&addr)[kLanes], uint32_t (&regs)[kLanes][4],
                 const char* what) {
  for (int i = 0; i < kMatrices; ++i) {
    bool used[kBankGroups] = {};
    for (int r = 0; r < kMatrixRows; ++r) {
      const int a = addr[kMatrixRows * i + r];
      CHECK(a % kRowBytes == 0 && a >= 0 && a + kRowBytes <= static_cast<int>(smem.size()),
            "%s: ldmatrix row address %d misaligned or outside the stage", what, a);
      const int group = a / kRowBytes % kBankGroups;
      CHECK(!used[group], "%s: ldmatrix matrix %d has a bank conflict (group %d twice)", what, i, group);
      used[group] = true;
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      const int row = lane / 4, word = lane % 4;
      std::memcpy(&regs[lane][i], smem.data() + addr[kMatrixRows * i + row] + kBytesPerReg * word, kBytesPerReg);
    }
  }
}

int byte_of(uint32_t reg, int j) { return static_cast<int8_t>(reg >> (8 * j) & 0xff); }

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, c += A . B, with the PTX ISA fragment layouts
// (lane = 4g + t; byte j of a register is the j-th of its 4 consecutive k):
//   A 16x32: a[0] = (row g, k 4t..4t+3)     a[1] = (row g+8, k 4t..4t+3)
//            a[2] = (row g, k 16+4t..+19)   a[3] = (row g+8, k 16+4t..+19)
//   B 32x8:  b[0] = (k 4t..4t+3, col g)  b[1] = (k 16+4t..16+4t+3, col g)
//   C 16x8:  c[0], c[1] = (row g, cols 2t, 2t+1)  c[2], c[3] = (row g+8, cols 2t, 2t+1)
void mma_m16n8k32(const uint32_t (&a)[kLanes][4], const uint32_t (&b)[kLanes][2], int (&c)[kLanes][4]) {
  int A[16][32], B[32][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
      A[g][4 * t + j] = byte_of(a[lane][0], j);
      A[g + 8][4 * t + j] = byte_of(a[lane][1], j);
      A[g][16 + 4 * t + j] = byte_of(a[lane][2], j);
      A[g + 8][16 + 4 * t + j] = byte_of(a[lane][3], j);
      B[4 * t + j][g] = byte_of(b[lane][0], j);
      B[16 + 4 * t + j][g] = byte_of(b[lane][1], j);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      for (int k = 0; k < 32; ++k) c[lane][i] += A[row][k] * B[k][col];
    }
  }
}

// A stage tile of `rows` x BLOCK_K int8 as TileLoader writes it: copy idx = tid + i * kThreads is
// (row, chunk) = (idx / kChunks, idx % kChunks), stored at Swizzle::offset(row, chunk). Checks the
// offsets are a permutation of the tile's chunks and that each phase of 8 consecutive copies (a cp.async
// wavefront) hits 8 different bank groups.
template <int BLOCK_K>
std::vector<unsigned char> stage_tile(const std::vector<int8_t>& x, int rows, const char* what) {
  using S = sm80::Swizzle<BLOCK_K>;
  std::vector<unsigned char> smem(static_cast<size_t>(rows) * BLOCK_K);
  std::vector<int> hits(rows * S::kChunks, 0);
  for (int idx = 0; idx < rows * S::kChunks; ++idx) {
    const int r = idx / S::kChunks, c = idx % S::kChunks;
    const int off = S::offset(r, c);
    CHECK(off % kRowBytes == 0 && off >= r * BLOCK_K && off + kRowBytes <= (r + 1) * BLOCK_K,
          "%s: chunk (%d, %d) lands at %d, outside its row", what, r, c, off);
    ++hits[off / kRowBytes];
    std::memcpy(smem.data() + off, x.data() + r * BLOCK_K + c * kRowBytes, kRowBytes);
    if (idx % kBankGroups == 0) {
      bool used[kBankGroups] = {};
      for (int j = 0; j < kBankGroups && idx + j < rows * S::kChunks; ++j) {
        const int q = idx + j, group = S::offset(q / S::kChunks, q % S::kChunks) / kRowBytes % kBankGroups;
        CHECK(!used[group], "%s: cp.async phase at copy %d has a bank conflict", what, idx);
        used[group] = true;
      }
    }
  }
  for (int h : hits) CHECK(h == 1, "%s: the swizzle is not a permutation of the chunks", what);
  return smem;
}

template <int BLOCK_M, int BLOCK_N, int kThreads>
void check_epilogue_layout(const char* name) {
  using L = epi::Layout<BLOCK_M, BLOCK_N, kThreads>;
  std::vector<int> hits(BLOCK_M * BLOCK_N, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    // The lanes sharing a row are in one warp (the row's max is a warp shuffle).
    const int row_leader = tid - L::lane_in_row(tid);
    CHECK(row_leader / kLanes == (row_leader + L::kLanesPerRow - 1) / kLanes, "%s: a row spans two warps", name);
    for (int r = L::first_row(tid); r < BLOCK_M; r += L::kRowsPerPass)
      for (int j = 0; j < L::kChunksPerLane; ++j)
        for (int i = 0; i < epi::kVec; ++i) ++hits[r * BLOCK_N + L::col(L::lane_in_row(tid), j) + i];
  }
  for (int h : hits) CHECK(h == 1, "%s: the epilogue layout does not cover the tile exactly once", name);
}

struct Accumulators {
  int c[kLanes][4];  // one m16n8 tile's c[0..3] per lane
};

template <class Cfg>
void check_config(const char* name, std::mt19937& rng) {
  constexpr int BM = Cfg::BLOCK_M, BN = Cfg::BLOCK_N, BK = Cfg::BLOCK_K, MT = Cfg::MT, NT = Cfg::NT;
  std::uniform_int_distribution<int> code(-128, 127);  // the full int8 range
  std::vector<int8_t> a(BM * BK), b(BN * BK);
  for (auto& v : a) v = static_cast<int8_t>(code(rng));
  for (auto& v : b) v = static_cast<int8_t>(code(rng));
  const std::vector<unsigned char> a_s = stage_tile<BK>(a, BM, name), b_s = stage_tile<BK>(b, BN, name);

  // staged[slice][row][col], as the kernel writes the accumulators before the K-slice reduction.
  std::vector<long long> staged(static_cast<size_t>(Cfg::WARPS_K) * BM * BN, 0);
  std::vector<int> hits(staged.size(), 0);
  for (int warp = 0; warp < Cfg::kThreads / kLanes; ++warp) {
    const auto wt = sm80::WarpTile<Cfg>::of(warp);
    std::vector<Accumulators> acc(MT * NT, Accumulators{});  // [mt * NT + nt]
    for (int ks = 0; ks < Cfg::KSTEPS; ++ks) {
      const int chunk = wt.step_chunk(ks);
      uint32_t af[MT][kLanes][4], bf[NT][kLanes][2];
      for (int mt = 0; mt < MT; ++mt) {
        int addr[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) addr[lane] = wt.a_ldmatrix(lane, mt, chunk);
        ldmatrix_x4(a_s, addr, af[mt], name);
      }
      for (int np = 0; np < NT / 2; ++np) {
        int addr[kLanes];
        uint32_t r[kLanes][4];
        for (int lane = 0; lane < kLanes; ++lane) addr[lane] = wt.b_ldmatrix(lane, np, chunk);
        ldmatrix_x4(b_s, addr, r, name);
        for (int lane = 0; lane < kLanes; ++lane) {  // the kernel's split of the x4 into two n8 tiles
          bf[2 * np][lane][0] = r[lane][0], bf[2 * np][lane][1] = r[lane][1];
          bf[2 * np + 1][lane][0] = r[lane][2], bf[2 * np + 1][lane][1] = r[lane][3];
        }
      }
      for (int mt = 0; mt < MT; ++mt)
        for (int nt = 0; nt < NT; ++nt)
          mma_m16n8k32(af[mt], bf[nt], acc[mt * NT + nt].c);
    }
    for (int mt = 0; mt < MT; ++mt)
      for (int nt = 0; nt < NT; ++nt)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int i = 0; i < 4; ++i) {
            const int row = wt.wm0 + mt * sm80::kMmaM + sm80::acc_row(lane, i);
            const int col = wt.wn0 + nt * sm80::kMmaN + sm80::acc_col(lane, i);
            const size_t at = (static_cast<size_t>(wt.slice) * BM + row) * BN + col;
            staged[at] = acc[mt * NT + nt].c[lane][i];
            ++hits[at];
          }
  }
  for (int h : hits) CHECK(h == 1, "%s: the warps' accumulators do not cover each (K slice, row, col) once", name);
  for (int row = 0; row < BM; ++row)
    for (int col = 0; col < BN; ++col) {
      long long want = 0, got = 0;
      for (int k = 0; k < BK; ++k) want += a[row * BK + k] * b[col * BK + k];
      for (int s = 0; s < Cfg::WARPS_K; ++s) got += staged[(static_cast<size_t>(s) * BM + row) * BN + col];
      CHECK(got == want, "%s: tile[%d][%d] = %lld, a . b^T = %lld", name, row, col, got, want);
    }
  check_epilogue_layout<BM, BN, Cfg::kThreads>(name);
  std::printf("ok %s\n", name);
}

int fragments() {
  std::mt19937 rng(2024);
  check_config<sm80::LargeConfig>("LargeConfig", rng);
  check_config<sm80::MediumConfig>("MediumConfig", rng);
  check_config<sm80::SmallMConfig>("SmallMConfig", rng);
  check_epilogue_layout<sm90::kBlockM, sm90::kBlockN, sm90::kThreads>("sm90 epilogue");
  std::printf("ok sm90 epilogue layout\n");
  return 0;
}

int plan() {
  int M, N, K, kind;
  DeviceInfo dev{};
  while (std::scanf("%d %d %d %d %d %d %d %d %d %d", &M, &N, &K, &kind, &dev.cc_major, &dev.cc_minor, &dev.sm_count,
                    &dev.smem_per_sm, &dev.smem_reserved_per_cta, &dev.threads_per_sm) == 10) {
    const Plan p = plan_int8_gemm(M, N, K, static_cast<OutKind>(kind), dev);
    std::printf("%d %d %d %d %d %d %d %d %d\n", static_cast<int>(p.status), static_cast<int>(p.kernel), p.block_m,
                p.block_n, p.m_tiles, p.n_tiles, p.grid, p.ctas_per_sm, p.coresident);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "fragments") return fragments();
  if (mode == "plan") return plan();
  std::fprintf(stderr, "usage: %s fragments|plan\n", argv[0]);
  return 2;
}
