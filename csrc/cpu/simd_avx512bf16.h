// AVX512-BF16 policy (VDPBF16PS), included by isa_avx512bf16.cpp and
// index_isa_avx512bf16.cpp after their target pragmas (internal linkage, like engine.h);
// see isa_avx512bf16.cpp for the numerics.
#pragma once
#include "simd_avx512.h"

namespace metaembed {
namespace cpu {
namespace {

struct Avx512Bf16Policy : Avx512Policy {
  static constexpr bool kTile16 = true;  // float panels: Avx512Policy's micro16x16; bf16: below
  template <class T>
  using Pack = std::conditional_t<std::is_same_v<T, bf16_t>, uint16_t, float>;
  template <class T>
  static constexpr bool kDirectRows = std::is_same_v<T, float> || std::is_same_v<T, bf16_t>;
  template <class T>
  static constexpr int64_t d_pack(int64_t d) {
    return std::is_same_v<T, bf16_t> ? (d + 1) / 2 * 2 : d;
  }

  using Avx512Policy::micro;
  using Avx512Policy::micro16x16;
  using Avx512Policy::pack_lanes;
  using Avx512Policy::pack_token;

  // Candidate-lane panels of bf16 pairs: 32-bit word p of a lane is dims (2p, 2p + 1), so the
  // fp32 transposes apply unchanged; an odd D's last word has a zero high half.
  static void pack_lanes(const bf16_t* const* src, int64_t d, uint16_t* panel) {
    pack_lanes32((d + 1) / 2, reinterpret_cast<float*>(panel), [src, d](int lane, int64_t p0, int) {
      const bf16_t* s = src[lane];
      if (!s) return _mm512_setzero_ps();
      const int64_t halves = d - 2 * p0;
      const __mmask32 m = halves >= 32 ? ~__mmask32(0) : __mmask32((1u << halves) - 1);
      return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, s + 2 * p0));
    });
  }

  // bf16 pairs: dim k of `lane` at panel[(k / 2) * 2 * NR + 2 * lane + (k % 2)].
  static void pack_token(const bf16_t* src, int64_t d, uint16_t* panel, int lane) {
    for (int64_t k = 0; k < d; ++k) panel[(k / 2) * 2 * NR + 2 * lane + (k & 1)] = src[k].bits;
  }

  template <int M>
  static inline void micro(const bf16_t* const* rows, const uint16_t* qp, int64_t kc, float* tile, bool accumulate) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, [tile](int r, const __m512* v) {
      _mm512_storeu_ps(tile + r * NR, v[0]);
      _mm512_storeu_ps(tile + r * NR + 16, v[1]);
    });
  }

  // As Avx512Policy::micro_epilogue: row r's finished lanes go to epi(r, v); with beside()
  // after every kBesideSteps dims (kBesideSteps / 2 pairs).
  using Avx512Policy::micro_epilogue;
  template <int M, class Epilogue>
  static inline void micro_epilogue(const bf16_t* const* rows, const uint16_t* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, epi, NoBeside{});
  }
  template <int M, class Epilogue, class Beside>
  static inline void micro_epilogue(const bf16_t* const* rows, const uint16_t* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi, Beside&& beside) {
    __m512 lo[M], hi[M];
    const bf16_t* rp[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      rp[r] = rows[r];
      lo[r] = accumulate ? _mm512_loadu_ps(tile + r * NR) : _mm512_setzero_ps();
      hi[r] = accumulate ? _mm512_loadu_ps(tile + r * NR + 16) : _mm512_setzero_ps();
    }
    const int64_t pairs = kc / 2;
    // Dims 2p and 2p + 1.
    auto pair = [&](int64_t p) __attribute__((always_inline)) {
      const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + p * 2 * NR);
      const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + p * 2 * NR + NR);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        uint32_t two;  // c[j][2p] in the low half, c[j][2p+1] in the high half
        std::memcpy(&two, rp[r] + 2 * p, sizeof(two));
        const __m512bh c = (__m512bh)_mm512_set1_epi32(int(two));
        lo[r] = _mm512_dpbf16_ps(lo[r], c, q0);
        hi[r] = _mm512_dpbf16_ps(hi[r], c, q1);
      }
    };
    int64_t p = 0;
    if constexpr (kHasBeside<Beside>) {
      constexpr int kPairs = kBesideSteps / 2;
      for (; p + kPairs <= pairs; p += kPairs) {
#pragma GCC unroll 2
        for (int u = 0; u < kPairs; ++u) pair(p + u);
        beside();
      }
    }
#pragma GCC unroll 2
    for (; p < pairs; ++p) pair(p);
    if (kc & 1) {  // last dim alone: (c, 0) against the packed (q, 0)
      const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + pairs * 2 * NR);
      const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + pairs * 2 * NR + NR);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512bh c = (__m512bh)_mm512_set1_epi32(int(rp[r][kc - 1].bits));
        lo[r] = _mm512_dpbf16_ps(lo[r], c, q0);
        hi[r] = _mm512_dpbf16_ps(hi[r], c, q1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 v[2] = {lo[r], hi[r]};
      epi(r, v);
    }
  }
  // The 16 x 16 tile for a query view of <= 16 tokens (Engine::tile16_path) on bf16 pairs:
  // candidate rows r < 16 at stride RS (bf16 elements), lanes 0-15 of the panel (the first
  // vector of each pair's 32 lanes), 16 accumulators. Each element is the 8 x 32 tile's chain
  // (one VDPBF16PS per pair of dims in order, then the odd last dim against (q, 0)), so values
  // are bitwise micro_epilogue's. A pair costs 1 load + 16 VDPBF16PS with a broadcast operand,
  // against the 8 x 32 tile's 2 + 8 per 16 when half of its lanes would be idle.
  template <int RS, class Epilogue, class Beside>
  static inline void micro16x16(const bf16_t* rows, const uint16_t* qp, int64_t kc, Epilogue&& epi, Beside&& beside) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    auto pair = [&](int64_t p) __attribute__((always_inline)) {
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qp + p * 2 * NR);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        uint32_t two;  // c[j][2p] in the low half, c[j][2p+1] in the high half
        std::memcpy(&two, rows + r * RS + 2 * p, sizeof(two));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(two)), q);
      }
    };
    const int64_t pairs = kc / 2;
    constexpr int kPairs = kBesideSteps / 2;
    int64_t p = 0;
    for (; p + kPairs <= pairs; p += kPairs) {
#pragma GCC unroll 2
      for (int u = 0; u < kPairs; ++u) pair(p + u);
      beside();
    }
    for (; p < pairs; ++p) pair(p);
    if (kc & 1) {  // last dim alone: (c, 0) against the packed (q, 0)
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qp + pairs * 2 * NR);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(rows[r * RS + kc - 1].bits)), q);
    }
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512 v[2] = {acc[r], acc[r]};
      epi(r, v);
    }
  }
};

// The index's bfloat16 scan with many query lanes: 64-lane query panels (four vectors) by 6
// candidate rows, 24 accumulators. One broadcast candidate pair then feeds four VDPBF16PS
// instead of two, so a pair of dims costs 6 broadcasts + 4 loads per 24 dot instructions
// (Avx512Bf16Policy: 8 + 2 per 16): at (1, 1) the scan is that loop, and the broadcasts
// held it near torch.matmul's rate. Same numerics as Avx512Bf16Policy (one VDPBF16PS chain per
// element over D), so scores are bitwise those of the 32-lane tile.
struct Avx512Bf16WidePolicy : Avx512Bf16Policy {
  static constexpr int NR = 64;
  static constexpr int MR = 6;
  static constexpr bool kWorkBeside = false;  // its micro_epilogue takes no beside() job
  static constexpr bool kTile16 = false;      // many query lanes: never a view of <= 16 tokens
  static constexpr int kVecs = NR / 16;
  static constexpr bool kDirectScoreRows = false;  // store_score_row writes 32 lanes

  // bf16 pairs: dim k of `lane` at panel[(k / 2) * 2 * NR + 2 * lane + (k % 2)].
  static void pack_token(const bf16_t* src, int64_t d, uint16_t* panel, int lane) {
    for (int64_t k = 0; k < d; ++k) panel[(k / 2) * 2 * NR + 2 * lane + (k & 1)] = src[k].bits;
  }

  template <int M>
  static inline void micro(const bf16_t* const* rows, const uint16_t* qp, int64_t kc, float* tile, bool accumulate) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, [tile](int r, const __m512* v) {
#pragma GCC unroll 4
      for (int h = 0; h < kVecs; ++h) _mm512_storeu_ps(tile + r * NR + 16 * h, v[h]);
    });
  }

  template <int M, class Epilogue>
  static inline void micro_epilogue(const bf16_t* const* rows, const uint16_t* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi) {
    __m512 acc[M][kVecs];
    const bf16_t* rp[M];
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      rp[r] = rows[r];
#pragma GCC unroll 4
      for (int h = 0; h < kVecs; ++h)
        acc[r][h] = accumulate ? _mm512_loadu_ps(tile + r * NR + 16 * h) : _mm512_setzero_ps();
    }
    const int64_t pairs = kc / 2;
#pragma GCC unroll 2
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh q[kVecs];
#pragma GCC unroll 4
      for (int h = 0; h < kVecs; ++h) q[h] = (__m512bh)_mm512_loadu_si512(qp + p * 2 * NR + 32 * h);
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        uint32_t two;  // c[j][2p] in the low half, c[j][2p+1] in the high half
        std::memcpy(&two, rp[r] + 2 * p, sizeof(two));
        const __m512bh c = (__m512bh)_mm512_set1_epi32(int(two));
#pragma GCC unroll 4
        for (int h = 0; h < kVecs; ++h) acc[r][h] = _mm512_dpbf16_ps(acc[r][h], c, q[h]);
      }
    }
    if (kc & 1) {  // last dim alone: (c, 0) against the packed (q, 0)
      __m512bh q[kVecs];
#pragma GCC unroll 4
      for (int h = 0; h < kVecs; ++h) q[h] = (__m512bh)_mm512_loadu_si512(qp + pairs * 2 * NR + 32 * h);
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        const __m512bh c = (__m512bh)_mm512_set1_epi32(int(rp[r][kc - 1].bits));
#pragma GCC unroll 4
        for (int h = 0; h < kVecs; ++h) acc[r][h] = _mm512_dpbf16_ps(acc[r][h], c, q[h]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) epi(r, acc[r]);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
