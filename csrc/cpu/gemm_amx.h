// AMX-INT8 GEMM kernel: c[m, n] = sum_k a[m, k] * b[n, k], exact in int32. Torch-free.
//
// tdpbssd multiplies a tile of 16 rows x 64 s8 by a tile of 16 k-groups x 16 columns x 4 s8 into 16 x 16
// int32, signed by signed, so there is no sign trick to undo (Epilogue::corr stays null). The weight b
// [N, K] is row-major with k contiguous, which is the first operand's layout as it stands: its tiles load
// straight from b (16 rows, stride K), no packing. The activations a take the second operand's place
// (the k-group layout, pack_b_panel<16, false> per 16 rows, O(M K) a call, shared by all N), so a result
// tile is c transposed: 16 columns of b x 16 rows of a. The epilogue transposes it back (transpose16x16)
// and runs epilogue_row_avx512 on each row, GELU included.
//
// A block is 32 columns of b x 32 rows of a: 4 result tiles, 2 of b and 2 of a, the 8 tile registers.
// Per 64 k it loads 4 tiles and issues 4 tdpbssd (16 x 16 x 64 products each).
//
// With the weight packed once (weight_cache.cpp) the same kernel, block, takes the operands the other way
// round and skips both the packing of a and the transposes.
//
// The tile unit needs K a multiple of 64 (whole rows of b tiles) and N a multiple of 16 (whole b tiles,
// so no tile load reads past b); the driver takes other shapes to the AVX-512 VNNI kernels, exact too.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_avx512.h"
#include "cpu/gemm_epilogue.h"

namespace qbert::cpu::amx {

constexpr int kTileRows = 16;   // rows of every tile used here
constexpr int kTileBytes = 64;  // bytes of a tile row: 64 s8, 16 x 4 s8 or 16 int32
constexpr int kKStep = kTileBytes;
constexpr int kBlockTiles = 2;                     // tiles of b and of a per block
constexpr int kBlock = kBlockTiles * kTileRows;    // 32 columns x 32 rows
constexpr int kNumTiles = 8;
constexpr uint8_t kPalette = 1;  // palette 1: 8 tiles of up to 16 rows x 64 bytes

// Tile register roles (block): results c[i][j] of first-operand tile i and second-operand tile column j,
// then the two first-operand tiles and the two second-operand ones. Macros, not constants: the tile
// intrinsics paste their tile number into the instruction text.
#define QBERT_TILE_C00 0
#define QBERT_TILE_C01 1
#define QBERT_TILE_C10 2
#define QBERT_TILE_C11 3
#define QBERT_TILE_P0 4
#define QBERT_TILE_P1 5
#define QBERT_TILE_Q0 6
#define QBERT_TILE_Q1 7

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#define QBERT_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")))

// Shapes the tile kernel takes (see the top of this file).
inline bool fits(int64_t N, int64_t K) { return K % kKStep == 0 && N % kTileRows == 0; }

// Bytes of one packed tile column of a: 16 rows x K.
inline int64_t a_tile_bytes(int64_t K) { return int64_t{kTileRows} * K; }

inline TileConfig make_config() {
  TileConfig cfg{};
  cfg.palette_id = kPalette;
  for (int t = 0; t < kNumTiles; ++t) {
    cfg.colsb[t] = kTileBytes;
    cfg.rows[t] = kTileRows;
  }
  return cfg;
}

// Configures this thread's tiles: all 8 are 16 rows x 64 bytes. The configuration is a static object:
// GCC 12's _tile_loadconfig tells the compiler it reads only the first 8 bytes, so a local one's other
// stores may be dropped as dead (the first tile instruction then faults: palette 0).
QBERT_AMX inline void configure() {
  static const TileConfig kConfig = make_config();
  _tile_loadconfig(&kConfig);
}

QBERT_AMX inline void release() { _tile_release(); }

// Packs rows [m0, m0 + mr) of a [M, K] (mr <= 16) as one tile column: [K / 4][16][4] s8, rows past mr 0.
QBERT_AMX inline void pack_a_tile(const int8_t* a, int64_t K, int64_t m0, int mr, uint8_t* dst) {
  avx512::pack_b_panel<kTileRows, false>(a, K, m0, mr, dst);
}

// The one tile kernel of both ways round: acc [F * 16][kBlock] (row stride kBlock) += F first-operand
// tiles (16 rows each from `p`, row stride `ld`: rows of b, or of a) x S second-operand tile columns (from
// `q`, `q_next` bytes apart: packed a, or packed b), result tile (i, j) at rows 16 i, columns 16 j.
template <int F, int S>
QBERT_AMX inline void block(const int8_t* p, int64_t ld, const uint8_t* q, int64_t q_next, int64_t K,
                            int32_t* acc) {
  static_assert(F >= 1 && F <= kBlockTiles && S >= 1 && S <= kBlockTiles, "a block is at most 2 x 2 tiles");
  _tile_zero(QBERT_TILE_C00);
  if constexpr (S > 1) _tile_zero(QBERT_TILE_C01);
  if constexpr (F > 1) _tile_zero(QBERT_TILE_C10);
  if constexpr (F > 1 && S > 1) _tile_zero(QBERT_TILE_C11);
  for (int64_t k = 0; k < K; k += kKStep) {
    const uint8_t* qt = q + k * kTileRows;  // k-groups k / 4 .. k / 4 + 15 of a tile column
    _tile_loadd(QBERT_TILE_P0, p + k, ld);
    _tile_loadd(QBERT_TILE_Q0, qt, kTileBytes);
    _tile_dpbssd(QBERT_TILE_C00, QBERT_TILE_P0, QBERT_TILE_Q0);
    if constexpr (S > 1) {
      _tile_loadd(QBERT_TILE_Q1, qt + q_next, kTileBytes);
      _tile_dpbssd(QBERT_TILE_C01, QBERT_TILE_P0, QBERT_TILE_Q1);
    }
    if constexpr (F > 1) {
      _tile_loadd(QBERT_TILE_P1, p + kTileRows * ld + k, ld);
      _tile_dpbssd(QBERT_TILE_C10, QBERT_TILE_P1, QBERT_TILE_Q0);
      if constexpr (S > 1) _tile_dpbssd(QBERT_TILE_C11, QBERT_TILE_P1, QBERT_TILE_Q1);
    }
  }
  constexpr int64_t kStride = kBlock * sizeof(int32_t);
  _tile_stored(QBERT_TILE_C00, acc, kStride);
  if constexpr (S > 1) _tile_stored(QBERT_TILE_C01, acc + kTileRows, kStride);
  if constexpr (F > 1) _tile_stored(QBERT_TILE_C10, acc + kTileRows * kBlock, kStride);
  if constexpr (F > 1 && S > 1) _tile_stored(QBERT_TILE_C11, acc + kTileRows * kBlock + kTileRows, kStride);
}

// ---- packed weights: b as the second operand, no transposes --------------------------------------------
// With b packed once ([N / 16][K / 4][16][4] s8, pack_b_tile_column; kept by weight_cache.cpp), the product
// runs the other way round: a's rows are the first operand straight from a (stride K), the packed b tiles
// the second (1 KiB contiguous each), and a result tile is c itself, 16 rows x 16 columns, which the
// epilogue reads row by row. Nothing is packed a call and nothing transposed.
inline int64_t b_column_bytes(int64_t K) { return int64_t{kTileRows} * K; }

QBERT_AMX inline void pack_b_tile_column(const int8_t* b, int64_t K, int64_t n0, uint8_t* dst) {
  avx512::pack_b_panel<kTileRows, false>(b, K, n0, kTileRows, dst);
}

// Runs the epilogue on a block computed with b first: acc [NT * 16 b columns][kBlock: a rows] becomes rows
// [MT * 16][kBlock] of `rows` (transposed), then epilogue_row_avx512 on the first `mr` rows.
QBERT_AMX inline void finish_transposed(const int32_t* acc, int nt, int mt, int mr, const Epilogue& e, int64_t m0,
                                        int64_t n0, int32_t* rows) {
  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < mt; ++j) {
      const int32_t* t = acc + i * kTileRows * kBlock + j * kTileRows;
      __m512i r[kTileRows];
      for (int x = 0; x < kTileRows; ++x) r[x] = _mm512_loadu_si512(t + x * kBlock);
      avx512::transpose16x16(r);
      for (int x = 0; x < kTileRows; ++x) _mm512_storeu_si512(rows + (j * kTileRows + x) * kBlock + i * kTileRows, r[x]);
    }
  for (int r = 0; r < mr; ++r) epilogue_row_avx512(e, rows + r * kBlock, m0 + r, n0, nt * kTileRows);
}

}  // namespace qbert::cpu::amx

#undef QBERT_TILE_C00
#undef QBERT_TILE_C01
#undef QBERT_TILE_C10
#undef QBERT_TILE_C11
#undef QBERT_TILE_P0
#undef QBERT_TILE_P1
#undef QBERT_TILE_Q0
#undef QBERT_TILE_Q1
