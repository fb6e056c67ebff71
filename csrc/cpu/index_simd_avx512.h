// AVX-512 pieces of the index scan, included by index_isa_avx512*.cpp after their target
// pragmas (internal linkage, like engine.h):
//
// * Avx512Dots: few-token dot products along D (one query at a small budget), float32 or
//   bfloat16 rows against float32 query rows; masked loads for the D tail. The 16-row scan
//   (dots16) reads float32 rows one after another and bfloat16 rows four side by side as
//   even / odd halves; the chunked path (dots) two or four rows side by side.
// * VnniInt8Ops: the int8 scan's integer kernels with VPDPBUSD (u8 x s8 -> s32, four
//   products per lane). Candidates are the unsigned operand: x + 128 (xor 0x80), so
//   sum_d (x_d + 128) y_d = <x, y> + 128 sum_d y_d, and the host subtracts the query side's
//   128 sum_d y_d (QInfo::corr). Query panels are [ceil(D/4)][NR lanes][4 bytes].
#pragma once
#include <type_traits>
#include <utility>

#include "index_engine.h"

namespace metaembed {
namespace cpu {
namespace {

inline __mmask16 tail_mask16(int64_t n) { return __mmask16((1u << n) - 1); }
inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

// ---- 16 rows' dot products into one vector of row sums (lane r = row r) ------------------
// The few-token scans keep one accumulator per (row, token) and reduce them together instead
// of one horizontal sum per dot product (45 instructions per token for 16 rows).

// Four rows' accumulators -> one vector whose 128-bit block k holds the four rows' partial
// sums over their block k: [a, b, c, d] (unpack + add, 6 instructions).
inline __m512 fold4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
  const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
}
inline __m512i fold4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// Two fold4 results (rows 4u .. 4u + 3 and 4v ..) -> their block sums in pairs:
// [u0 + u1, u2 + u3, v0 + v1, v2 + v3] (blocks); twice over gives lane r = row r's total.
inline __m512 fold_blocks(__m512 u, __m512 v) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u, v, _MM_SHUFFLE(3, 1, 3, 1)));
}
inline __m512i fold_blocks(__m512i u, __m512i v) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(u, v, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(u, v, _MM_SHUFFLE(3, 1, 3, 1)));
}

// sums[t] lane r = row r's sum for token t < NT, where rows4(r0, f) sets f[t] = fold4 of rows
// r0 .. r0 + 3 against token t.
template <int NT, class V, class Rows4>
inline void lane_sums16(Rows4&& rows4, V* sums) {
  V f0[NT], f1[NT], s01[NT];
  rows4(0, f0);
  rows4(4, f1);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) s01[t] = fold_blocks(f0[t], f1[t]);
  rows4(8, f0);
  rows4(12, f1);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) sums[t] = fold_blocks(s01[t], fold_blocks(f0[t], f1[t]));
}

struct Avx512Dots {
  template <int NT, int RB, class RowT>
  static void rows_block(const RowT* const* rows, const float* const* q, int64_t k0, int64_t n, float* tile, int nr,
                         bool accumulate) {
    __m512 acc[RB][NT];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
      __m512 c[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) c[r] = load16(rows[r] + d);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m512 qt = _mm512_loadu_ps(q[t] + k0 + d);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(c[r], qt, acc[r][t]);
      }
    }
    if (d < n) {
      const __mmask16 m = tail_mask16(n - d);
      __m512 c[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) c[r] = load16_tail(rows[r] + d, m);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m512 qt = _mm512_maskz_loadu_ps(m, q[t] + k0 + d);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(c[r], qt, acc[r][t]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const float s = _mm512_reduce_add_ps(acc[r][t]);
        tile[r * nr + t] = accumulate ? tile[r * nr + t] + s : s;
      }
  }

  template <int NT, class RowT>
  static void dots_nt(const RowT* const* rows, int M, const float* const* q, int64_t k0, int64_t n, float* tile,
                      int nr, bool accumulate) {
    constexpr int RB = NT == 1 ? 4 : 2;
    int r = 0;
    for (; r + RB <= M; r += RB) rows_block<NT, RB>(rows + r, q, k0, n, tile + r * nr, nr, accumulate);
    for (; r < M; ++r) rows_block<NT, 1>(rows + r, q, k0, n, tile + r * nr, nr, accumulate);
  }

  // bfloat16 rows 32 dims at a time as two float32 vectors without a widening shuffle: the
  // even dims are each 32-bit lane's low half shifted up, the odd dims its high half with the
  // low half cleared; the query's 32 dims are split the same way (two permutes, shared by the
  // four rows). Exact float32 products as load16's; about 40% fewer instructions per byte,
  // which lets a one-query scan (a memory-bound GEMV) keep more of its row stream in flight.
  template <int NT>
  static inline void rows4_bf16_pairs(const bf16_t* const* rows, const float* const* q, int64_t n, __m512* out) {
    constexpr bool kSplit = NT <= 2;  // separate even / odd chains while registers allow
    __m512 even[4][NT], odd[4][kSplit ? NT : 1];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        even[r][t] = _mm512_setzero_ps();
        if constexpr (kSplit) odd[r][t] = _mm512_setzero_ps();
      }
    const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx = _mm512_add_epi32(even_idx, _mm512_set1_epi32(1));
    for (int64_t d = 0; d < n; d += 32) {
      // Past n: the rows' and the query's lanes load as zeros (never read).
      const __mmask32 m = __mmask32(n - d >= 32 ? ~uint32_t(0) : (uint32_t(1) << (n - d)) - 1);
      const __mmask16 mlo = __mmask16(m), mhi = __mmask16(m >> 16);
      __m512 ce[4], co[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512i x = _mm512_maskz_loadu_epi16(m, rows[r] + d);
        ce[r] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        co[r] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
      }
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m512 lo = _mm512_maskz_loadu_ps(mlo, q[t] + d), hi = _mm512_maskz_loadu_ps(mhi, q[t] + d + 16);
        const __m512 qe = _mm512_permutex2var_ps(lo, even_idx, hi), qo = _mm512_permutex2var_ps(lo, odd_idx, hi);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          even[r][t] = _mm512_fmadd_ps(ce[r], qe, even[r][t]);
          if constexpr (kSplit) {
            odd[r][t] = _mm512_fmadd_ps(co[r], qo, odd[r][t]);
          } else {
            even[r][t] = _mm512_fmadd_ps(co[r], qo, even[r][t]);
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      if constexpr (kSplit) {
        out[t] = fold4(_mm512_add_ps(even[0][t], odd[0][t]), _mm512_add_ps(even[1][t], odd[1][t]),
                       _mm512_add_ps(even[2][t], odd[2][t]), _mm512_add_ps(even[3][t], odd[3][t]));
      } else {
        out[t] = fold4(even[0][t], even[1][t], even[2][t], even[3][t]);
      }
    }
  }

  // out[16 t] = <row, q_t> for t < NT: the row read once, front to back, two FMA chains per
  // token while registers allow, each reduced to a scalar at the end.
  template <int NT, class RowT>
  static inline void row_dots(const RowT* row, const float* const* q, int64_t n, float* out) {
    constexpr int kChains = NT <= 2 ? 2 : 1;
    __m512 acc[NT][kChains];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
      for (int h = 0; h < kChains; ++h) acc[t][h] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 * kChains <= n; d += 16 * kChains)
#pragma GCC unroll 2
      for (int h = 0; h < kChains; ++h) {
        const __m512 c = load16(row + d + 16 * h);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) acc[t][h] = _mm512_fmadd_ps(c, _mm512_loadu_ps(q[t] + d + 16 * h), acc[t][h]);
      }
    for (; d < n; d += 16) {
      const __mmask16 m = n - d >= 16 ? __mmask16(0xFFFF) : tail_mask16(n - d);
      const __m512 c = load16_tail(row + d, m);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[t][0] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, q[t] + d), acc[t][0]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      __m512 a = acc[t][0];
      if constexpr (kChains == 2) a = _mm512_add_ps(a, acc[t][1]);
      out[16 * t] = _mm512_reduce_add_ps(a);
    }
  }

  // float32 rows one after another (row_dots), not four side by side: on a Zen 4 EPYC the
  // side-by-side walk streamed a one-vector slab at 16 GB/s on 2 cores, one row at a time at
  // 30-40 (its scalar reductions are cheap beside a memory-bound scan). bfloat16 rows stay
  // four side by side (rows4_bf16_pairs): there they stream as fast either way, and the four
  // rows share the query's even / odd permutes (one row at a time cost 1.4x at 4 tokens).
  template <int NT, class RowT>
  static void dots16_nt(const RowT* const* rows, const float* const* q, int64_t n, float* out) {
    if constexpr (std::is_same_v<RowT, bf16_t>) {
      __m512 sums[NT];
      lane_sums16<NT>([&](int r0, __m512* f) { rows4_bf16_pairs<NT>(rows + r0, q, n, f); }, sums);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + 16 * t, sums[t]);
    } else {
#pragma GCC unroll 2
      for (int r = 0; r < 16; ++r) row_dots<NT>(rows[r], q, n, out + r);
    }
  }

  // out[t][r] = <row_r, q_t> over n elements for 16 rows and nt <= 4 query rows (the
  // candidates' sums in the lanes the few-token scan works in).
  template <class RowT>
  static void dots16(const RowT* const* rows, const float* const* q, int nt, int64_t n, float* out) {
    return with_token_count(nt, [&](auto t) { return dots16_nt<decltype(t)::value>(rows, q, n, out); });
  }

  template <class RowT>
  static void dots(const RowT* const* rows, int M, const float* const* q, int nt, int64_t k0, int64_t n, float* tile,
                   int nr, bool accumulate) {
    return with_token_count(
        nt, [&](auto t) { return dots_nt<decltype(t)::value>(rows, M, q, k0, n, tile, nr, accumulate); });
  }
};

// kNR query lanes (16 or 32: one or two vectors per row) by kMR candidate rows. 32 x 8 for
// query blocks of more than 16 tokens; 16 x 16 for blocks of up to 16 (one query at budget
// (16, r_c), or 16 queries at (1, r_c)), whose upper half of a 32-lane panel would multiply
// zero padding: same dot products, half the VPDPBUSD.
template <int kNR, int kMR>
struct VnniInt8OpsT {
  static constexpr int NR = kNR;
  static constexpr int MR = kMR;
  static constexpr int NV = kNR / 16;  // accumulators per row
  static_assert(kNR == 16 || kNR == 32, "one or two vectors per row");
  static constexpr int32_t kOffset = 128;

  // Out of line: inlined into Int8Scan's run_tile, GCC 12.2 -O3 produced wrong tiles for the
  // 16 x 16 variant at small D (test_search_grouped_matches_brute_force_with_ties, D = 24);
  // -O0 and this out-of-line copy are right (a standalone -O3 harness of micro_m agrees with
  // the scalar sums too). One call per tile of up to 16 candidates: no measurable cost.
  template <int M>
  __attribute__((noinline)) static void micro_m(const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    const __m512i bias = _mm512_set1_epi8(char(0x80));  // x + 128 as u8: x xor 0x80
    __m512i acc[M][NV];
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int64_t p = 0; p < g4; ++p) {
      __m512i q[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) q[v] = _mm512_loadu_si512(qp + p * 4 * NR + 64 * v);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        int32_t four;
        std::memcpy(&four, rows[r] + 4 * p, 4);
        const __m512i c = _mm512_xor_si512(_mm512_set1_epi32(four), bias);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], c, q[v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) _mm512_storeu_si512(tile + r * NR + 16 * v, acc[r][v]);
  }

  template <int... Ms>
  static void micro_switch(int M, const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile,
                           std::integer_sequence<int, Ms...>) {
    // Ms = 0 .. MR - 1: rows M = Ms + 1
    (void)((M == Ms + 1 ? (micro_m<Ms + 1>(rows, qp, g4, tile), true) : false) || ...);
  }

  static void micro(int M, const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    micro_switch(M, rows, qp, g4, tile, std::make_integer_sequence<int, MR>{});
  }

  // fold4 of rows src[0..3] against NT query rows.
  template <int NT>
  static inline void rows4(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int64_t D, __m512i* out) {
    const __m512i bias = _mm512_set1_epi8(char(0x80));
    __m512i acc[4][NT];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_si512();
    for (int64_t d = 0; d < D; d += 64) {
      const __mmask64 m = tail_mask64(D - d);
      __m512i x[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) x[r] = _mm512_xor_si512(load64(src[r] + d, D - d, m), bias);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m512i y = _mm512_loadu_si512(qrows + t * dpad + d);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], x[r], y);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) out[t] = fold4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
  }

  // 64 bytes of a row, the last chunk of a row masked (nothing past D is touched). Full chunks
  // take plain loads: masked ones streamed markedly slower on a Zen 4 EPYC (below).
  static inline __m512i load64(const int8_t* p, int64_t left, __mmask64 m) {
    return left >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
  }

  // out[16 t] = sum_d (x[d] + 128) y_t[d] for one row, read front to back.
  template <int NT>
  static inline void row_dots(const int8_t* src, const int8_t* qrows, int64_t dpad, int64_t D, int32_t* out) {
    const __m512i bias = _mm512_set1_epi8(char(0x80));
    __m512i acc[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_si512();
    for (int64_t d = 0; d < D; d += 64) {
      const __m512i x = _mm512_xor_si512(load64(src + d, D - d, tail_mask64(D - d)), bias);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], x, _mm512_loadu_si512(qrows + t * dpad + d));
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) out[16 * t] = _mm512_reduce_add_epi32(acc[t]);
  }

  // One or two tokens (one query at (1, r_c) or (2, r_c)): rows one after another with plain
  // loads; the one-query (1, 1) scan took 0.58 ms against 0.96 for four masked rows side by
  // side (median of 5 process minima, N = 200k, Zen 4). Three or four tokens keep the four
  // rows side by side (four reductions per row cost more than the stream gains there).
  template <int NT>
  static void dots_nt(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int64_t D, int32_t* out) {
    if constexpr (NT <= 2) {
#pragma GCC unroll 2
      for (int r = 0; r < 16; ++r) row_dots<NT>(src[r], qrows, dpad, D, out + r);
      return;
    }
    __m512i sums[NT];
    lane_sums16<NT>([&](int r0, __m512i* f) { rows4<NT>(src + r0, qrows, dpad, D, f); }, sums);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) _mm512_storeu_si512(out + 16 * t, sums[t]);
  }

  // out[t][r] = sum_d (x_r[d] + 128) y_t[d] for 16 rows and t < nt (<= 4) query rows of dpad
  // bytes (zero past D), reduced by lane_sums16: the candidates' sums land in the lanes the
  // few-token scan works in.
  static void dots(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int nt, int64_t D, int32_t* out) {
    return with_token_count(nt, [&](auto t) { return dots_nt<decltype(t)::value>(src, qrows, dpad, D, out); });
  }
};

using VnniInt8Ops = VnniInt8OpsT<32, 8>;
using VnniInt8NarrowOps = VnniInt8OpsT<16, 16>;

}  // namespace
}  // namespace cpu
}  // namespace metaembed
