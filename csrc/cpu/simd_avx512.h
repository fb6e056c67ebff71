// AVX-512 policy, included by isa_avx512.cpp and isa_avx512bf16.cpp after their target
// pragmas (it has internal linkage, like engine.h).
//
// Micro-kernel: an 8 x 32 register tile, rows = 8 candidate tokens, lanes = 32 query
// tokens (two zmm). Per step of d: 2 loads of packed query lanes, 8 broadcasts, 16 FMAs
// into 16 accumulators (19 of 32 zmm live). 8 rows divide the common Rc (64, 128, ...).
#pragma once
#include "engine.h"

namespace metaembed {
namespace cpu {
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const bf16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// Masked loads for the last n < 16 elements: nothing past the end is touched.
inline __m512 load16_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_tail(const f16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16_tail(const bf16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16 x 16 transpose of 32-bit elements in registers: afterwards r[e] holds element e of
// every input row (lane i = row i). Four stages of 16 shuffles: 32-bit and 64-bit unpacks
// within 128-bit lanes, then two rounds of 128-bit lane selects.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + e]: rows 4i..4i+3, element 4L + e in 128-bit lane L
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);  // rows 0-7: elements e, 8 + e
    t[4 + e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);  // rows 0-7: elements 4 + e, 12 + e
    t[8 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
    t[12 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
  }
}

// One panel of NR = 32 token lanes whose element k of lane l is 32-bit word k of source l:
// words [k0, k0 + 16) of 16 lanes are loaded by load(lane, k0, n) (n valid words, the rest
// zero), transposed and stored as rows k of the panel. Null sources are zero lanes.
template <class Load>
inline void pack_lanes32(int64_t words, float* panel, Load&& load) {
  constexpr int NR = 32;
  for (int64_t k0 = 0; k0 < words; k0 += 16) {
    const int n = int(words - k0 < 16 ? words - k0 : 16);
#pragma GCC unroll 2
    for (int h = 0; h < NR / 16; ++h) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = load(h * 16 + i, k0, n);
      transpose16x16(r);
      for (int e = 0; e < n; ++e) _mm512_storeu_ps(panel + (k0 + e) * NR + h * 16, r[e]);
    }
  }
}

struct Avx512Policy : AccPacking<float, 32> {
  using Acc = float;
  static constexpr int NR = 32;
  static constexpr int MR = 8;

  // A 1-row tile (r_c = 1, or the last token of r_c = MR k + 1) would leave only two
  // accumulators to cover the FMA latency, so D is split across S = 4 interleaved
  // accumulator sets, summed at the end. Every taller tile accumulates each element as one
  // sequential FMA chain over D, whatever its height: an element's value is then the same
  // in every layout and tiling (engine.h, candidate lanes), so a saved argmax equals the
  // backward's recompute, near-ties included. (ops_cpu.cpp's choose_blocking keeps the
  // candidate-lane layout away from budgets with a 1-row tail tile: r_c = 1 has no choice of j.)
  template <int M>
  static inline void micro(const float* const* rows, const float* qp, int64_t kc, float* tile, bool accumulate) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, [tile](int r, const __m512* v) {
      _mm512_storeu_ps(tile + r * NR, v[0]);
      _mm512_storeu_ps(tile + r * NR + 16, v[1]);
    });
  }

  // The micro-kernel with its last step left to the caller: epi(r, v) receives row r's
  // finished lanes in registers, v[h] = lanes [16 h, 16 h + 16) (micro stores them; the index's (1, 1)
  // scan compares them with the top-k bars without a store). `tile` is read only to accumulate.
  template <int M, class Epilogue>
  static inline void micro_epilogue(const float* const* rows, const float* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, epi, NoBeside{});
  }

  // The same with beside() called after every kBesideSteps steps of d, inside the FMA loop:
  // a little independent work that the FMAs hide (Engine::LinePrefetch: the next
  // candidate's rows). Once per block rather than per step, so that its state can live in
  // memory between calls: the 8 row pointers leave no general registers for it.
  static constexpr bool kWorkBeside = true;
  static constexpr int kBesideSteps = 4;
  template <int M, class Epilogue, class Beside>
  static inline void micro_epilogue(const float* const* rows, const float* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi, Beside&& beside) {
    constexpr int S = M == 1 ? 4 : 1;
    __m512 lo[S][M], hi[S][M];
    const float* rp[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      rp[r] = rows[r];
      lo[0][r] = accumulate ? _mm512_loadu_ps(tile + r * NR) : _mm512_setzero_ps();
      hi[0][r] = accumulate ? _mm512_loadu_ps(tile + r * NR + 16) : _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) lo[s][r] = hi[s][r] = _mm512_setzero_ps();
    }
    // Steps k .. k + S - 1, step k + s into accumulator set s.
    auto steps = [&](int64_t k) __attribute__((always_inline)) {
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        const __m512 q0 = _mm512_loadu_ps(qp + (k + s) * NR);
        const __m512 q1 = _mm512_loadu_ps(qp + (k + s) * NR + 16);
#pragma GCC unroll 8
        for (int r = 0; r < M; ++r) {
          const __m512 c = _mm512_set1_ps(rp[r][k + s]);
          lo[s][r] = _mm512_fmadd_ps(c, q0, lo[s][r]);
          hi[s][r] = _mm512_fmadd_ps(c, q1, hi[s][r]);
        }
      }
    };
    int64_t k = 0;
    if constexpr (kHasBeside<Beside>) {
      for (; k + kBesideSteps <= kc; k += kBesideSteps) {
#pragma GCC unroll 4
        for (int u = 0; u < kBesideSteps; u += S) steps(k + u);
        beside();
      }
    }
#pragma GCC unroll 2
    for (; k + S <= kc; k += S) steps(k);
    for (; k < kc; ++k) {
      const __m512 q0 = _mm512_loadu_ps(qp + k * NR);
      const __m512 q1 = _mm512_loadu_ps(qp + k * NR + 16);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512 c = _mm512_set1_ps(rp[r][k]);
        lo[0][r] = _mm512_fmadd_ps(c, q0, lo[0][r]);
        hi[0][r] = _mm512_fmadd_ps(c, q1, hi[0][r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) {
        lo[0][r] = _mm512_add_ps(lo[0][r], lo[s][r]);
        hi[0][r] = _mm512_add_ps(hi[0][r], hi[s][r]);
      }
      const __m512 v[2] = {lo[0][r], hi[0][r]};
      epi(r, v);
    }
  }

  // A 16 x 16 tile for a query view of at most 16 tokens (a per-query view at Rq <= 16, which
  // would fill only half the 8 x 32 tile's lanes): rows = 16 candidate tokens at the fixed
  // stride RS from `rows`, lanes = query tokens 0..15 (the first zmm of each step's panel row).
  // Per step of d: 1 query load, 16 FMAs on broadcasts straight from memory, all from one base
  // register (16 row pointers would not fit the general registers: GCC parks 6 of them in
  // vector registers, a vmovq on the FMA port for each). Each element is one sequential FMA
  // chain over d, as in the 8 x 32 tile's rows. epi(r, v) gets row r as v[0] = v[1] (the fold
  // takes 32 lanes; lanes 16-31 repeat 0-15 and are never read). beside() as micro_epilogue's.
  // On one core, rows and queries in L1: 171 useful GFLOP/s at Rq = 16 against 85 for the
  // 8 x 32 tile.
  static constexpr bool kTile16 = true;
  template <int RS, class Epilogue, class Beside>
  static inline void micro16x16(const float* rows, const float* qp, int64_t kc, Epilogue&& epi, Beside&& beside) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    auto step = [&](int64_t k) __attribute__((always_inline)) {
      const __m512 q = _mm512_loadu_ps(qp + k * NR);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r * RS + k]), q, acc[r]);
    };
    int64_t k = 0;
    for (; k + kBesideSteps <= kc; k += kBesideSteps) {
#pragma GCC unroll 4
      for (int u = 0; u < kBesideSteps; ++u) step(k + u);
      beside();
    }
    for (; k < kc; ++k) step(k);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512 v[2] = {acc[r], acc[r]};
      epi(r, v);
    }
  }

  // Engine::score_candidate's running max without argmax, on the micro-kernel's registers:
  // lanes [0, 32) of one panel. fold(v) takes a row where v > m; a NaN row is remembered in a
  // lane mask and written as NaN by store(), after which max(v, m) keeps it (a NaN m is never
  // replaced: MAXPS returns its second operand when either is NaN). So a NaN similarity
  // sticks, as in torch.amax, and no branch or blend sits in the FMA loop's epilogue.
  static constexpr bool kFoldMax = true;
  struct MaxFold {
    __m512 m0, m1;
    __mmask16 nan0 = 0, nan1 = 0;
    explicit MaxFold(const float* runmax) : m0(_mm512_loadu_ps(runmax)), m1(_mm512_loadu_ps(runmax + 16)) {}
    void fold(const __m512* v) {
      nan0 |= _mm512_cmp_ps_mask(v[0], v[0], _CMP_UNORD_Q);
      nan1 |= _mm512_cmp_ps_mask(v[1], v[1], _CMP_UNORD_Q);
      m0 = _mm512_max_ps(v[0], m0);  // v > m ? v : m
      m1 = _mm512_max_ps(v[1], m1);
    }
    void store(float* runmax) const {
      const __m512 nan = _mm512_set1_ps(__builtin_nanf(""));
      _mm512_storeu_ps(runmax, _mm512_mask_mov_ps(m0, nan0, nan));
      _mm512_storeu_ps(runmax + 16, _mm512_mask_mov_ps(m1, nan1, nan));
    }
  };

  // The same fold tracking the argmax (score_candidate with kArgmax): row j is taken where
  //   S > m, or S is NaN and m is not   ==   !(S <= m) (unordered: true) and m is not NaN,
  // and unconditionally when it is the candidate's first valid row (`first`).
  struct ArgmaxFold {
    __m512 m0, m1;
    __m512i i0, i1;
    ArgmaxFold(const float* runmax, const int32_t* runidx)
        : m0(_mm512_loadu_ps(runmax)), m1(_mm512_loadu_ps(runmax + 16)),
          i0(_mm512_loadu_si512(runidx)), i1(_mm512_loadu_si512(runidx + 16)) {}
    static void take(__m512 v, int32_t j, bool first, __m512& m, __m512i& i) {
      const __mmask16 k = first ? __mmask16(0xFFFF)
                                : _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(m, m, _CMP_ORD_Q), v, m, _CMP_NLE_UQ);
      m = _mm512_mask_mov_ps(m, k, v);
      i = _mm512_mask_mov_epi32(i, k, _mm512_set1_epi32(j));
    }
    void fold(const __m512* v, int32_t j, bool first) {
      take(v[0], j, first, m0, i0);
      take(v[1], j, first, m1, i1);
    }
    void store(float* runmax, int32_t* runidx) const {
      _mm512_storeu_ps(runmax, m0);
      _mm512_storeu_ps(runmax + 16, m1);
      _mm512_storeu_si512(runidx, i0);
      _mm512_storeu_si512(runidx + 16, i1);
    }
  };

  // Candidate-lane score rows: two 64-byte aligned non-temporal stores, fenced once per task.
  static constexpr bool kStreamScores = true;
  static void stream_row(float* dst, const float* src) {
    _mm512_stream_ps(dst, _mm512_loadu_ps(src));
    _mm512_stream_ps(dst + 16, _mm512_loadu_ps(src + 16));
  }
  static void stream_fence() { _mm_sfence(); }

  // One row of scores from a micro-kernel row still in registers (v[0], v[1]: lanes 0-15,
  // 16-31): lanes whose bit of `keep` is clear score 0, the others 0 + v (as lane_epilogue's
  // sums, which start at 0); nl lanes at dst, streamed when the row is full and `stream`.
  static constexpr bool kDirectScoreRows = true;
  static void store_score_row(const __m512* v, uint32_t keep, float* dst, int nl, bool stream) {
    const __m512 lo = _mm512_maskz_add_ps(__mmask16(keep), _mm512_setzero_ps(), v[0]);
    const __m512 hi = _mm512_maskz_add_ps(__mmask16(keep >> 16), _mm512_setzero_ps(), v[1]);
    if (stream && nl == NR) {
      _mm512_stream_ps(dst, lo);
      _mm512_stream_ps(dst + 16, hi);
      return;
    }
    const uint32_t m = nl >= 32 ? ~0u : (1u << nl) - 1;
    _mm512_mask_storeu_ps(dst, __mmask16(m), lo);
    _mm512_mask_storeu_ps(dst + 16, __mmask16(m >> 16), hi);
  }

  // Candidate-lane panels (engine.h): 16 x 16 transposes, converting to fp32 on the way.
  template <class T>
  static void pack_lanes(const T* const* src, int64_t d, float* panel) {
    pack_lanes32(d, panel, [src](int lane, int64_t k0, int n) {
      const T* s = src[lane];
      if (!s) return _mm512_setzero_ps();
      return n == 16 ? load16(s + k0) : load16_tail(s + k0, __mmask16((1u << n) - 1));
    });
  }

  template <class T>
  static void convert(const T* src, float* dst, int64_t n) {
    int64_t k = 0;
    if constexpr (std::is_same_v<T, bf16_t>) {
      // bf16 -> fp32 is the bf16 in a word's high half: one word permute (VPERMW, zeroing the
      // low halves) per 16 values, where load16's zero-extend and shift take two ALU ops, both on
      // the FMA ports (this conversion is the bf16 micro-kernel's overhead).
      const __m512i lo_words = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0,
                                                5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
      const __m512i hi_words = _mm512_add_epi16(lo_words, _mm512_set1_epi32(16 << 16));
      for (; k + 32 <= n; k += 32) {
        const __m512i x = _mm512_loadu_si512(src + k);
        _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, lo_words, x)));
        _mm512_storeu_ps(dst + k + 16, _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, hi_words, x)));
      }
    }
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, load16(src + k));
    if (k < n) {
      const __mmask16 m = __mmask16((1u << (n - k)) - 1);
      _mm512_mask_storeu_ps(dst + k, m, load16_tail(src + k, m));
    }
  }

  template <class T>
  static void axpy(float w, const T* x, float* y, int64_t n) {
    const __m512 wv = _mm512_set1_ps(w);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(y + k, _mm512_fmadd_ps(wv, load16(x + k), _mm512_loadu_ps(y + k)));
    if (k < n) {
      const __mmask16 m = __mmask16((1u << (n - k)) - 1);
      const __m512 yv = _mm512_maskz_loadu_ps(m, y + k);
      _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(wv, load16_tail(x + k, m), yv));
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
