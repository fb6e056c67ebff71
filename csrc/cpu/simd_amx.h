// AMX-BF16 policy (Intel Sapphire Rapids and later: TDPBF16PS on 16 x 16 fp32 tiles), included
// by isa_amx.cpp after its target pragma (internal linkage, like engine.h).
//
// Everything but the bf16 similarity tile is Avx512Policy's: fp32 and fp16 inputs, the
// candidate-lane layout, the few-token dot path, the folds and the backward's axpys. For bf16
// candidates against a query panel, Engine::score_candidate_amx computes a candidate's rows
// 16 at a time with
//   C[r][l] = sum_d c[j0 + r][d] * q[l][d]      (16 rows x 16 lanes per tile, fp32 accumulation)
// one TDPBF16PS per 32 dims and 16 lanes: 16 x 16 x 32 multiply-adds, where a 512-bit FMA does
// 16. Products of bf16 are exact in fp32; TDPBF16PS, like VDPBF16PS, treats denormal inputs as
// zero and flushes denormal results (the avx512_bf16 ISA's numerics).
#pragma once
#include "simd_avx512.h"

namespace metaembed {
namespace cpu {
namespace {

struct AmxPolicy : Avx512Policy {
  static constexpr bool kAmx = true;
  static constexpr int kAmxK = 32;             // bf16 dims per TDPBF16PS (16 pairs)
  static constexpr int kAmxBlock = 16 * kAmxK;  // uint16 per B block: 16 pair rows x 16 lanes x 2

  // Tile registers: 0, 1 accumulate lanes [0, 16) and [16, 32); 2 holds 16 candidate rows of 32
  // dims (A); 3, 4 the query lanes' matching 16 dim pairs (B, pair-interleaved). All 16 x 64 B.
  // 5 (A) and 6, 7 (C) are their 8-row versions, for the engine's MR = 8 row tiles (amx_tile8).
  struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 8, 8, 8};
  };

  // Loads the tile configuration on the calling thread. Tile state is per thread and any other
  // AMX user (oneDNN inside torch) may reconfigure it between our calls, so every kernel call
  // that uses tiles configures them first and releases them (amx_release) when done.
  static void amx_configure() {
    static const TileConfig config{};
    _tile_loadconfig(&config);
  }
  static void amx_release() { _tile_release(); }

  // out[r * 32 + l] = sum_{d < 32 ksteps} a[r][d] * q[l][d] for r < 16 and l < 16 * halves: `a` is
  // 16 rows of bf16 at a_stride bytes (32 ksteps dims each, zero beyond D), `b` the panel's B
  // blocks, block (s, h) at b + (2 s + h) * kAmxBlock: row p holds (q[16 h + l][32 s + 2 p],
  // q[16 h + l][32 s + 2 p + 1]) for l < 16.
  static void amx_tile16(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t ksteps, int halves,
                         float* out) {
    _tile_zero(0);
    if (halves == 2) {
      _tile_zero(1);
      for (int64_t s = 0; s < ksteps; ++s) {
        _tile_loadd(2, a + s * kAmxK, a_stride);
        _tile_loadd(3, b + (2 * s) * kAmxBlock, 64);
        _tile_loadd(4, b + (2 * s + 1) * kAmxBlock, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(1, out + 16, 32 * sizeof(float));
    } else {
      for (int64_t s = 0; s < ksteps; ++s) {
        _tile_loadd(2, a + s * kAmxK, a_stride);
        _tile_loadd(3, b + (2 * s) * kAmxBlock, 64);
        _tile_dpbf16ps(0, 2, 3);
      }
    }
    _tile_stored(0, out, 32 * sizeof(float));
  }

  // amx_tile16 for 8 rows and both halves, stored straight into an MR x NR tile: out[r * NR + l]
  // (the engine's register-tile layout) for r < 8, l < 32.
  static void amx_tile8(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t ksteps, float* out) {
    static_assert(MR == 8 && NR == 32, "amx_tile8 fills the engine's 8 x 32 tile");
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t s = 0; s < ksteps; ++s) {
      _tile_loadd(5, a + s * kAmxK, a_stride);
      _tile_loadd(3, b + (2 * s) * kAmxBlock, 64);
      _tile_loadd(4, b + (2 * s + 1) * kAmxBlock, 64);
      _tile_dpbf16ps(6, 5, 3);
      _tile_dpbf16ps(7, 5, 4);
    }
    _tile_stored(6, out, NR * sizeof(float));
    _tile_stored(7, out + 16, NR * sizeof(float));
  }

  // epi(r, v) for rows r < mr of amx_tile16's `out`, v[h] = lanes [16 h, 16 h + 16) (zeros for the
  // half that was not computed): the register rows that Engine::fold_rows folds.
  template <class Epilogue>
  static inline void amx_rows(const float* out, int mr, int halves, Epilogue&& epi) {
    for (int r = 0; r < mr; ++r) {
      const __m512 v[2] = {_mm512_loadu_ps(out + r * 32),
                           halves == 2 ? _mm512_loadu_ps(out + r * 32 + 16) : _mm512_setzero_ps()};
      epi(r, v);
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
