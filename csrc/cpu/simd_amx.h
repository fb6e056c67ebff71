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

  // The configuration of amx_halves_dot: every tile 16 x 64 B (C 0-3, A 4, B 5-7).
  struct alignas(64) HalvesConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  };

  // Loads a tile configuration on the calling thread. Tile state is per thread and any other
  // AMX user (oneDNN inside torch) may reconfigure it between our calls, so every kernel call
  // that uses tiles configures them first and releases them (amx_release) when done.
  static void amx_configure(AmxTiles which) {
    static const TileConfig rows8{};
    static const HalvesConfig halves{};
    if (which == kAmxHalves) _tile_loadconfig(&halves);
    else _tile_loadconfig(&rows8);
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

  // Up to four C tiles from one A tile (HalvesConfig): C tile h (h < NH) holds
  // sum_{d < 32 ks} a[r][d] * q[16 h + l][d] for rows r < 16 and lanes l < 16. `a` as
  // amx_tile16's; b[h] is query half h's B block for k-step 0 (amx_tile16's layout, one half),
  // k-step s's at b[h] + s * b_step. Four independent 16-row accumulators where amx_tile8 has
  // two 8-row ones: a (1, 1) search of 256 queries over 20,000 candidates ran 1.24x faster
  // (Xeon with AMX, 2 threads, 3 alternating process pairs). Each element is amx_tile16's
  // value. Tried there and no faster in the scan: B tiles rotated over 5, 6, 7 across k-steps
  // (no load waits on the product just issued), and testing the previous block's tiles while
  // these products run.
  template <int NH>
  static void amx_halves_dot(const uint16_t* a, int64_t a_stride, const uint16_t* const* b, int64_t b_step,
                             int64_t ksteps) {
    static_assert(NH >= 1 && NH <= 4, "one to four C tiles");
    _tile_zero(0);
    if constexpr (NH > 1) _tile_zero(1);
    if constexpr (NH > 2) _tile_zero(2);
    if constexpr (NH > 3) _tile_zero(3);
    for (int64_t s = 0; s < ksteps; ++s) {
      _tile_loadd(4, a + s * kAmxK, a_stride);
      _tile_loadd(5, b[0] + s * b_step, 64);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (NH > 1) {
        _tile_loadd(6, b[1] + s * b_step, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (NH > 2) {
        _tile_loadd(7, b[2] + s * b_step, 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if constexpr (NH > 3) {
        _tile_loadd(5, b[3] + s * b_step, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
  }
  // out[h * 256 + r * 16 + l] = C tile h's element (r, l), h < NH.
  template <int NH>
  static void amx_halves_store(float* out) {
    _tile_stored(0, out, 64);
    if constexpr (NH > 1) _tile_stored(1, out + 256, 64);
    if constexpr (NH > 2) _tile_stored(2, out + 512, 64);
    if constexpr (NH > 3) _tile_stored(3, out + 768, 64);
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
