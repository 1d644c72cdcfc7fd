// Blocking, threading and ISA dispatch of the int8 GEMM (kernels in gemm_avx512.h / gemm_avx2.h).
//
// Packed path: the work is a grid of (B panel of kNr columns) x (chunk of M). A thread packs a B
// panel once into a thread-local buffer (kNr * K bytes: 36 KiB at K = 768 on AVX-512, kept between
// calls so it is allocated once per thread and K) and sweeps its M chunk with the
// micro-kernel, applying the epilogue to each kMr x kNr tile as it finishes. Tasks are numbered panel
// by panel, so parallel_for's contiguous split (cpu/parallel.h) hands each thread whole panels and B is packed once
// per call overall. M is chunked only when the panels alone cannot keep every thread busy.
//
// Large outputs: an f32 output of at least kStreamOutBytes (BERT at batch 8: the FFN1 output is
// 1024 x 3072 x 4 = 12.6 MB, the 768-wide ones 3.1 MB) is written with non-temporal stores (AVX-512
// path, Epilogue::stream). Each thread writes 48-column strips of all M rows; ordinary stores pull
// every output line in by read-for-ownership (from DRAM when, as in a real forward, the output memory
// is cold) and likely crowd out of L2 the rows of A the next panel re-reads. In situ, BERT-base batch
// 8 x 128: FFN1 3.3 -> 2.5 ms a call; the GELU that reads it back from DRAM pays ~0.06 ms. Blocking M outer
// (per-thread packed panels reused over 128-row blocks) and prefetchw of the next tile's output
// lines measured no gain with ordinary stores. Batch 1 (outputs <= 1.5 MB) keeps ordinary stores.
//
// Cold weights (a BERT forward cycles 85 MB of them): each thread walks a contiguous run of panels,
// i.e. contiguous rows of b, and while its micro-tiles compute panel p they prefetch the rows of
// panel p + 1 (AVX-512 path; avx512::Prefetch), so the pack never waits on DRAM.
#include "cpu/gemm_driver.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/gemm_amx.h"
#include "cpu/gemm_avx2.h"
#include "cpu/gemm_avx512.h"
#include "cpu/parallel.h"

namespace qbert::cpu {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using avx512::Prefetch;

inline void prefetch_lines(const int8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += avx512::kLineBytes)
    _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// f32 outputs at least this large are written with non-temporal stores (see the top of this file).
constexpr int64_t kStreamOutBytes = int64_t{2} << 20;
constexpr int64_t kStreamAlign = 64;  // _mm512_stream_ps needs 64-byte aligned addresses

// Whether the f32 output of an [M, N] product goes out with non-temporal stores: large enough, and its
// start and rows 64-byte aligned (the kernels stream whole vectors at multiples of 16 columns only).
bool streams(const Epilogue& epi, int64_t M, int64_t N) {
  return epi.out_kind == OutKind::kF32 && M * N * int64_t{sizeof(float)} >= kStreamOutBytes &&
         reinterpret_cast<uintptr_t>(epi.out) % kStreamAlign == 0 &&
         (epi.ldo * int64_t{sizeof(float)}) % kStreamAlign == 0;
}

// Below this many rows of A the AVX-512 path skips packing B (O(N K), as costly as the whole product
// when M is tiny) and uses the row-major dot kernel instead.
constexpr int64_t kSmallM = 8;
// Rows x K per parallel task in the O(M K) preparation of A, so a task outweighs its scheduling.
constexpr int64_t kMinPrepElemsPerTask = 16384;
// With at least this many panels per thread the split over panels alone is balanced enough.
constexpr int64_t kPanelsPerThreadBalanced = 4;

// ---- kernel policies: one per ISA, each a thin adapter over the kernel headers ---------------------
struct Avx512Policy {
  static constexpr int kMr = avx512::kMr, kNr = avx512::kNr;
  static constexpr bool kCorr = true;
  static constexpr bool kPrefetch = true;  // micro() streams in the next panel's rows (Prefetch)
  static constexpr bool kStream = true;    // store_tile honours Epilogue::stream
  using AElem = int8_t;
  using BElem = uint8_t;
  static int64_t panel_elems(int64_t K) { return avx512::panel_bytes(K); }
  static int64_t a_ld(int64_t K) { return avx512::k_groups(K) * avx512::kKGroup; }
  static void pack(const int8_t* b, int64_t K, int64_t n0, int nr, BElem* dst) {
    avx512::pack_b_panel(b, K, n0, nr, dst);
  }
  static void micro(int mr, const AElem* a, int64_t lda, const BElem* bp, int64_t K, const Epilogue& e, int64_t m0,
                    int64_t n0, int nr, int32_t* tile, const Prefetch& pf) {
    avx512::micro_kernel_rows(mr, a, lda, bp, avx512::k_groups(K), e, m0, n0, nr, tile, pf);
  }
  static int32_t corr(const int8_t* a, int64_t K) { return avx512::row_corr(a, K); }
};

struct AvxVnniPolicy {
  static constexpr int kMr = avx2::kMr, kNr = avx2::kNr;
  static constexpr bool kCorr = true;
  static constexpr bool kPrefetch = false;  // micro() ignores its Prefetch
  static constexpr bool kStream = false;    // epilogue_row_avx2 ignores Epilogue::stream
  using AElem = int8_t;
  using BElem = uint8_t;
  static int64_t panel_elems(int64_t K) { return avx2::vnni_panel_bytes(K); }
  static int64_t a_ld(int64_t K) { return avx2::groups(K, avx2::kVnniGroup) * avx2::kVnniGroup; }
  static void pack(const int8_t* b, int64_t K, int64_t n0, int nr, BElem* dst) {
    avx2::vnni_pack_b_panel(b, K, n0, nr, dst);
  }
  static void micro(int mr, const AElem* a, int64_t lda, const BElem* bp, int64_t K, const Epilogue& e, int64_t m0,
                    int64_t n0, int nr, int32_t* tile, const Prefetch&) {
    avx2::vnni_micro_kernel_rows(mr, a, lda, bp, avx2::groups(K, avx2::kVnniGroup), tile);
    for (int r = 0; r < mr; ++r) epilogue_row_avx2(e, tile + r * kNr, m0 + r, n0, nr);
  }
  static int32_t corr(const int8_t* a, int64_t K) { return avx2::vnni_row_corr(a, K); }
};

struct Avx2Policy {
  static constexpr int kMr = avx2::kMr, kNr = avx2::kNr;
  static constexpr bool kCorr = false;  // signed x signed: nothing to undo
  static constexpr bool kPrefetch = false;
  static constexpr bool kStream = false;
  using AElem = int16_t;
  using BElem = int16_t;
  static int64_t panel_elems(int64_t K) { return avx2::madd_panel_elems(K); }
  static int64_t a_ld(int64_t K) { return avx2::madd_a_ld(K); }
  static void pack(const int8_t* b, int64_t K, int64_t n0, int nr, BElem* dst) {
    avx2::madd_pack_b_panel(b, K, n0, nr, dst);
  }
  static void micro(int mr, const AElem* a, int64_t lda, const BElem* bp, int64_t K, const Epilogue& e, int64_t m0,
                    int64_t n0, int nr, int32_t* tile, const Prefetch&) {
    avx2::madd_micro_kernel_rows(mr, a, lda, bp, avx2::groups(K, avx2::kMaddGroup), tile);
    for (int r = 0; r < mr; ++r) epilogue_row_avx2(e, tile + r * kNr, m0 + r, n0, nr);
  }
  static int32_t corr(const int8_t*, int64_t) { return 0; }
};

// Copies row a[K] into dst[ld] (widening to int16 for AVX2), zero-padding the k-group tail.
template <class AElem>
void prepare_a_row(const int8_t* a, int64_t K, int64_t ld, AElem* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = a[k];
  for (int64_t k = K; k < ld; ++k) dst[k] = 0;
}

template <class P>
void run_packed(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi) {
  using AElem = typename P::AElem;
  using BElem = typename P::BElem;
  // A as the micro-kernel reads it: a itself when its rows already fill whole k-groups of the right
  // element type, else a padded (and, for AVX2, widened) copy made up front.
  const int64_t lda = P::a_ld(K);
  constexpr bool kSameElem = std::is_same_v<AElem, int8_t>;
  const bool copy_a = !kSameElem || lda != K;
  std::vector<AElem> a_copy(copy_a ? M * lda : 0);
  if (copy_a) {
    parallel_for(0, M, std::max<int64_t>(1, kMinPrepElemsPerTask / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) prepare_a_row(a + m * K, K, lda, a_copy.data() + m * lda);
    });
  }
  const AElem* ap = copy_a ? a_copy.data() : reinterpret_cast<const AElem*>(a);

  // Full-width tiles start at column 48 p: 64-byte aligned whenever the output and its rows are.
  if (P::kStream) epi.stream = streams(epi, M, N);

  const int64_t n_panels = ceil_div(N, P::kNr), m_tiles = ceil_div(M, P::kMr);
  const int64_t threads = num_threads();
  int64_t m_chunks = 1;
  if (n_panels % threads != 0 && n_panels < kPanelsPerThreadBalanced * threads)
    m_chunks = std::min(m_tiles, ceil_div(kPanelsPerThreadBalanced * threads, n_panels));
  const int64_t tiles_per_chunk = ceil_div(m_tiles, m_chunks);
  m_chunks = ceil_div(m_tiles, tiles_per_chunk);

  parallel_for(0, n_panels * m_chunks, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<BElem> panel;
    panel.resize(std::max<size_t>(panel.size(), P::panel_elems(K)));
    // Each thread computes the VNNI corrections of the rows it meets itself: that scan of A costs
    // K/64 vpdpbusd a row against 3K/4 a row for every panel, less than another fork-join round.
    thread_local std::vector<int32_t> corr;
    corr.resize(std::max<size_t>(corr.size(), M));
    Epilogue e = epi;
    e.corr = P::kCorr ? corr.data() : nullptr;
    alignas(64) int32_t tile[P::kMr * P::kNr];
    int64_t packed = -1, corrected = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / m_chunks, chunk = t % m_chunks;
      const int64_t n0 = p * P::kNr;
      const int nr = static_cast<int>(std::min<int64_t>(P::kNr, N - n0));
      if (p != packed) {
        // The first panel of a thread is not prefetched: a burst of prefetches for all its rows saved
        // ~6 us cold at 128 x 768 x 768 but cost ~4 us when the weight is hot in cache.
        P::pack(b, K, n0, nr, panel.data());
        packed = p;
      }
      const int64_t mt0 = chunk * tiles_per_chunk, mt1 = std::min(m_tiles, (chunk + 1) * tiles_per_chunk);
      if (P::kCorr && chunk != corrected) {
        for (int64_t m = mt0 * P::kMr; m < std::min(M, mt1 * P::kMr); ++m) corr[m] = P::corr(a + m * K, K);
        corrected = chunk;
      }
      // On the last task of panel p in this thread, stream in the rows of b the next task will pack.
      // The lines are spread evenly over the micro-tiles of this task, per_tile to each.
      Prefetch pf;
      int64_t pf_left = 0, per_tile = 0;
      const int64_t np = p + 1;
      if (P::kPrefetch && (t + 1) % m_chunks == 0 && t + 1 < t1 && np < n_panels) {
        pf.p = b + np * P::kNr * K;
        pf_left = ceil_div(std::min<int64_t>(P::kNr, N - np * P::kNr) * K, avx512::kLineBytes);
        per_tile = ceil_div(pf_left, mt1 - mt0);
        pf.every = std::max<int64_t>(1, avx512::k_groups(K) / per_tile);
      }
      for (int64_t mt = mt0; mt < mt1; ++mt) {
        const int64_t m0 = mt * P::kMr;
        const int mr = static_cast<int>(std::min<int64_t>(P::kMr, M - m0));
        pf.lines = std::min(per_tile, pf_left);
        P::micro(mr, ap + m0 * lda, lda, panel.data(), K, e, m0, n0, nr, tile, pf);
        // A tile issues at most one line per k-group (few tiles, short K): the rest go out here.
        const int64_t issued = std::min(pf.lines, ceil_div(avx512::k_groups(K), pf.every));
        prefetch_lines(pf.p + issued * avx512::kLineBytes, (pf.lines - issued) * avx512::kLineBytes);
        pf.p += pf.lines * avx512::kLineBytes;
        pf_left -= pf.lines;
      }
    }
    if (epi.stream) _mm_sfence();  // order the non-temporal stores before the join
  });
}

// AVX-512 small-M path: no packing; tiles of kNr columns computed by row-major dot products.
void run_dot_avx512(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi) {
  std::vector<int32_t> corr(M);
  for (int64_t m = 0; m < M; ++m) corr[m] = avx512::row_corr(a + m * K, K);
  epi.corr = corr.data();
  constexpr int kCols = avx512::kNr;
  parallel_for(0, ceil_div(N, kCols), 1, [&](int64_t c0, int64_t c1) {
    alignas(64) int32_t tile[avx512::kDotMaxRows * kCols];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kCols;
      const int nr = static_cast<int>(std::min<int64_t>(kCols, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += avx512::kDotMaxRows) {
        const int mb = static_cast<int>(std::min<int64_t>(avx512::kDotMaxRows, M - m0));
        avx512::dot_tile(a, m0, mb, b, n0, nr, N - 1, K, tile, kCols);
        for (int r = 0; r < mb; ++r) epilogue_row_avx512(epi, tile + r * kCols, m0 + r, n0, nr);
      }
    }
  });
}

// ---- AMX (gemm_amx.h) -------------------------------------------------------------------------------
// Two ways round. b packed (the weight cache's copy): a's rows are the first operand, straight from a,
// except the rows of a last, partial block, copied into a zero-padded block first (a tile load reads 16
// whole rows); the result tiles are c. b not packed: b's rows are the first operand and a is packed here,
// once a call; the result tiles are c transposed (finish_transposed).
// The work is (chunk of a's rows) x (block of 32 columns of b), chunk by chunk, so a thread's run of tasks
// is consecutive blocks of b over one chunk of a, which holds at most kAmxChunkBytes of a and stays in L2.
constexpr int64_t kAmxChunkBytes = int64_t{1} << 20;

struct AmxScratch {
  alignas(64) int32_t acc[amx::kBlock * amx::kBlock];
  alignas(64) int32_t rows[amx::kBlock * amx::kBlock];  // the transposed result
  std::vector<int8_t> pad;                             // a partial block of a's rows
};

// The blocks of rows [16 mt0, 16 mt1) against columns [n0, n0 + NT * 16).
template <int NT>
void amx_blocks_of(const int8_t* a, const int8_t* b, const uint8_t* b_packed, const uint8_t* a_packed, int64_t M,
                   int64_t K, int64_t mt0, int64_t mt1, const Epilogue& e, int64_t n0, AmxScratch& s) {
  using namespace amx;
  for (int64_t mt = mt0; mt < mt1; mt += kBlockTiles) {
    const int64_t m0 = mt * kTileRows;
    const bool whole = mt + 1 < mt1;
    const int64_t rows = std::min<int64_t>((whole ? kBlockTiles : 1) * kTileRows, M - m0);
    if (b_packed != nullptr) {
      const int8_t* ar = a + m0 * K;
      if (rows % kTileRows != 0) {
        s.pad.assign((whole ? kBlockTiles : 1) * kTileRows * K, 0);
        std::copy(ar, ar + rows * K, s.pad.begin());
        ar = s.pad.data();
      }
      const uint8_t* bq = b_packed + (n0 / kTileRows) * b_column_bytes(K);
      if (whole)
        block<kBlockTiles, NT>(ar, K, bq, b_column_bytes(K), K, s.acc);
      else
        block<1, NT>(ar, K, bq, b_column_bytes(K), K, s.acc);
      for (int64_t r = 0; r < rows; ++r) epilogue_row_avx512(e, s.acc + r * kBlock, m0 + r, n0, NT * kTileRows);
    } else {
      const uint8_t* aq = a_packed + mt * a_tile_bytes(K);
      if (whole)
        block<NT, kBlockTiles>(b + n0 * K, K, aq, a_tile_bytes(K), K, s.acc);
      else
        block<NT, 1>(b + n0 * K, K, aq, a_tile_bytes(K), K, s.acc);
      finish_transposed(s.acc, NT, whole ? kBlockTiles : 1, static_cast<int>(rows), e, m0, n0, s.rows);
    }
  }
}

void run_amx(const int8_t* a, const int8_t* b, const uint8_t* b_packed, int64_t M, int64_t N, int64_t K,
             Epilogue epi) {
  using namespace amx;
  epi.stream = streams(epi, M, N);
  const int64_t a_tiles = ceil_div(M, kTileRows);
  const uint8_t* a_packed = nullptr;
  if (b_packed == nullptr) {
    thread_local std::vector<uint8_t> packed;  // the calling thread's, kept between calls
    packed.resize(std::max<size_t>(packed.size(), a_tiles * a_tile_bytes(K)));
    uint8_t* ap = packed.data();
    parallel_for(0, a_tiles, std::max<int64_t>(1, kMinPrepElemsPerTask / a_tile_bytes(K)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        pack_a_tile(a, K, t * kTileRows, static_cast<int>(std::min<int64_t>(kTileRows, M - t * kTileRows)),
                    ap + t * a_tile_bytes(K));
    });
    a_packed = ap;
  }

  const int64_t n_blocks = ceil_div(N, kBlock), m_blocks = ceil_div(a_tiles, kBlockTiles);
  int64_t blocks_per_chunk = std::max<int64_t>(1, kAmxChunkBytes / (kBlock * K));
  int64_t m_chunks = ceil_div(m_blocks, blocks_per_chunk);
  const int64_t threads = num_threads();
  if (n_blocks * m_chunks < kPanelsPerThreadBalanced * threads) {
    m_chunks = std::min(m_blocks, ceil_div(kPanelsPerThreadBalanced * threads, n_blocks));
    blocks_per_chunk = ceil_div(m_blocks, m_chunks);
    m_chunks = ceil_div(m_blocks, blocks_per_chunk);
  }
  const int64_t tiles_per_chunk = blocks_per_chunk * kBlockTiles;

  parallel_for(0, m_chunks * n_blocks, 1, [&](int64_t t0, int64_t t1) {
    configure();
    thread_local AmxScratch scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / n_blocks, n0 = (t % n_blocks) * kBlock;
      const int64_t mt0 = chunk * tiles_per_chunk, mt1 = std::min(a_tiles, mt0 + tiles_per_chunk);
      if (N - n0 >= kBlock)
        amx_blocks_of<kBlockTiles>(a, b, b_packed, a_packed, M, K, mt0, mt1, epi, n0, scratch);
      else
        amx_blocks_of<1>(a, b, b_packed, a_packed, M, K, mt0, mt1, epi, n0, scratch);
    }
    release();
    if (epi.stream) _mm_sfence();  // order the non-temporal stores before the join
  });
}

// ---- scalar: the portable reference path (baseline x86-64 has no FMA, so nothing can contract) ----
float load_bias_scalar(const Epilogue& e, int64_t n) {
  switch (e.bias_kind) {
    case BiasKind::kF32: return static_cast<const float*>(e.bias)[n];
    case BiasKind::kF16: return static_cast<float>(static_cast<const c10::Half*>(e.bias)[n]);
    case BiasKind::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(e.bias)[n]);
    case BiasKind::kNone: break;
  }
  return 0.0f;
}

void epilogue_row_scalar(const Epilogue& e, const int32_t* acc, int64_t m, int64_t n0, int nr) {
  const int64_t o = m * e.ldo + n0;
  for (int j = 0; j < nr; ++j) {
    if (e.out_kind == OutKind::kI32) {
      static_cast<int32_t*>(e.out)[o + j] = acc[j];
      continue;
    }
    float y = static_cast<float>(acc[j]) * e.x_scale[m];
    y = y * e.w_scale[n0 + j];
    if (e.bias_kind != BiasKind::kNone) y = y + load_bias_scalar(e, n0 + j);
    switch (e.out_kind) {
      case OutKind::kF32: static_cast<float*>(e.out)[o + j] = y; break;
      case OutKind::kF16: static_cast<c10::Half*>(e.out)[o + j] = c10::Half(y); break;
      case OutKind::kBF16: static_cast<c10::BFloat16*>(e.out)[o + j] = c10::BFloat16(y); break;
      case OutKind::kI32: break;
    }
  }
}

void run_scalar(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& epi) {
  constexpr int kCols = avx512::kNr;  // any tile width works; this keeps one row of results in L1
  parallel_for(0, M, std::max<int64_t>(1, kMinPrepElemsPerTask / (N * K) ), [&](int64_t m0, int64_t m1) {
    int32_t tile[kCols];
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n0 = 0; n0 < N; n0 += kCols) {
        const int nr = static_cast<int>(std::min<int64_t>(kCols, N - n0));
        for (int j = 0; j < nr; ++j) {
          const int8_t* ar = a + m * K;
          const int8_t* br = b + (n0 + j) * K;
          int32_t s = 0;  // |s| <= K * 128 * 128 < 2^31 for K <= 131071
          for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(ar[k]) * br[k];
          tile[j] = s;
        }
        epilogue_row_scalar(epi, tile, m, n0, nr);
      }
  });
}

}  // namespace

bool amx_packs(Isa isa, int64_t N, int64_t K) { return isa == Isa::kAmxInt8 && amx::fits(N, K); }

int64_t amx_packed_bytes(int64_t N, int64_t K) { return N * K; }

void amx_pack_weight(const int8_t* b, int64_t N, int64_t K, uint8_t* dst) {
  const int64_t columns = N / amx::kTileRows;
  parallel_for(0, columns, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      amx::pack_b_tile_column(b, K, c * amx::kTileRows, dst + c * amx::b_column_bytes(K));
  });
}

void int8_gemm_fused(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epilogue epi, Isa isa,
                     const uint8_t* b_packed) {
  // Only the AVX-512 epilogues apply a GELU; the other paths would silently leave it out.
  TORCH_CHECK(!epi.gelu || has_avx512(isa), "int8_gemm_fused: a GELU epilogue needs the AVX-512 kernels, got ",
              isa_name(isa));
  if (M == 0 || N == 0) return;
  switch (isa) {
    case Isa::kAmxInt8:
      if (M >= kSmallM && amx::fits(N, K)) return run_amx(a, b, b_packed, M, N, K, epi);
      [[fallthrough]];  // other shapes: the AVX-512 kernels, exact as well (gemm_amx.h)
    case Isa::kAvx512Vnni:
      if (M < kSmallM) return run_dot_avx512(a, b, M, N, K, epi);
      return run_packed<Avx512Policy>(a, b, M, N, K, epi);
    case Isa::kAvxVnni: return run_packed<AvxVnniPolicy>(a, b, M, N, K, epi);
    case Isa::kAvx2: return run_packed<Avx2Policy>(a, b, M, N, K, epi);
    case Isa::kScalar: return run_scalar(a, b, M, N, K, epi);
  }
}

}  // namespace qbert::cpu
