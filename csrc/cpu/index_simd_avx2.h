// AVX2 pieces of the index scan, included by index_isa_avx2.cpp after its target pragma
// (internal linkage, like engine.h):
//
// * Avx2Dots: few-token dot products along D (one query at a small budget), float32 or
//   bfloat16 rows against float32 query rows: rows one after another in blocks of 8 / NT,
//   each row's sums kept in registers and the block's reduced together by horizontal adds
//   (fold8 / fold4 / fold2: about one instruction per row instead of a horizontal sum per
//   dot product). bfloat16 rows with D % 16 == 0 and 1-2 query tokens: dots16_pairs, with
//   the query in pair order.
// * Avx2Int8Ops: the int8 scan's integer kernels. No VNNI here, so the integer dots use
//   VPMADDUBSW (u8 x s8 -> saturating s16 pairs) with the sign trick: |x| (<= 128 as u8) times
//   y * sign(x) (|y| <= 127), so a pair sums to at most 2 * 128 * 127 = 32512 and never
//   saturates; VPMADDWD with ones widens to s32. Candidate bytes are used as they are (no
//   bias, QInfo::corr = 0). Query panels are [ceil(D/4)][16][4].
#pragma once
#include <cstring>
#include <type_traits>

#include "index_engine.h"

namespace metaembed {
namespace cpu {
namespace {

// ---- several accumulators -> one vector of their sums (lane r = accumulator r) ----------
inline __m128 fold4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d | a b c d] halves
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}
inline __m128i fold4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}
inline __m256 fold8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline __m256i fold8(const __m256i* v) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// out[0, RB) = the sums of acc[0, RB) (RB = 8, 4 or 2).
template <int RB>
inline void store_sums(const __m256* acc, float* out) {
  if constexpr (RB == 8) {
    _mm256_storeu_ps(out, fold8(acc));
  } else if constexpr (RB == 4) {
    _mm_storeu_ps(out, fold4(acc[0], acc[1], acc[2], acc[3]));
  } else {
    static_assert(RB == 2, "blocks of 8, 4 or 2 rows");
    const __m128 s = fold4(acc[0], acc[1], acc[0], acc[1]);
    _mm_storel_pi(reinterpret_cast<__m64*>(out), s);
  }
}
template <int RB>
inline void store_sums(const __m256i* acc, int32_t* out) {
  if constexpr (RB == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), fold8(acc));
  } else if constexpr (RB == 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), fold4(acc[0], acc[1], acc[2], acc[3]));
  } else {
    static_assert(RB == 2, "blocks of 8, 4 or 2 rows");
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), fold4(acc[0], acc[1], acc[0], acc[1]));
  }
}

// Rows side by side per block: 8 accumulators for one token, 4 rows x 2 tokens, 2 x 4.
template <int NT>
constexpr int few_rows_block() {
  return NT == 1 ? 8 : NT == 2 ? 4 : 2;
}

// Lanes [0, n) of 8 (n may exceed 8) as an all-ones 32-bit mask.
inline __m256i lanes_below8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct Avx2Dots {
  // Dims [d, d + 8) of a row, d + 8 <= n; tail8: the last n - d < 8 dims, zeros past n
  // (nothing past n is read).
  static inline __m256 tail8(const float* x, int64_t left) { return _mm256_maskload_ps(x, lanes_below8(left)); }
  static inline __m256 tail8(const bf16_t* x, int64_t left) {
    alignas(16) bf16_t part[8] = {};
    std::memcpy(part, x, sizeof(bf16_t) * size_t(left));
    return load8(part);
  }

  // out[t][r] (stride ostride per token) = <rows[r], q_t[k0, k0 + n)> over n elements for RB
  // rows, each row read front to back (two FMA chains per token; bfloat16 widened by load8),
  // the block's sums folded together. Rows side by side (8 rows 32 bytes at a time) streamed
  // slower: one float32 query at (1, 1) over 200k rows took 8.0-9.2 ms against 6.0-6.5 one
  // row after another (2 cores of a Zen 3 EPYC, two processes each). kPairs: bfloat16 rows in
  // pair order (dots16_pairs), n % 16 == 0.
  template <int NT, int RB, class RowT, bool kPairs = false>
  static inline void rows_block(const RowT* const* rows, const float* const* q, int64_t k0, int64_t n, float* out,
                                int64_t ostride) {
    static_assert(!kPairs || std::is_same_v<RowT, bf16_t>, "pair order is for bfloat16 rows");
    __m256 sum[NT][RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const RowT* x = rows[r];
      __m256 a0[NT], a1[NT];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 16 <= n; d += 16) {
        __m256 c0, c1;
        if constexpr (kPairs) {  // 16 dims in one load: even dims (lanes << 16), odd (high halves)
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d));
          c0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          c1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u))));
        } else {
          c0 = load8(x + d);
          c1 = load8(x + d + 8);
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          a0[t] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(q[t] + k0 + d), a0[t]);
          a1[t] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(q[t] + k0 + d + 8), a1[t]);
        }
      }
      for (; !kPairs && d < n; d += 8) {
        const __m256i m = lanes_below8(n - d);
        const __m256 c = n - d >= 8 ? load8(x + d) : tail8(x + d, n - d);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) a0[t] = _mm256_fmadd_ps(c, _mm256_maskload_ps(q[t] + k0 + d, m), a0[t]);
      }
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) sum[t][r] = _mm256_add_ps(a0[t], a1[t]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_sums<RB>(sum[t], out + t * ostride);
  }

  template <int NT, class RowT, bool kPairs = false>
  static void dots16_nt(const RowT* const* rows, const float* const* q, int64_t n, float* out) {
    constexpr int RB = few_rows_block<NT>();
    for (int r = 0; r < 16; r += RB) rows_block<NT, RB, RowT, kPairs>(rows + r, q, 0, n, out + r, 16);
  }

  // out[t][r] = <rows[r], q_t> over n elements for 16 rows and nt <= 4 query rows.
  template <class RowT>
  static void dots16(const RowT* const* rows, const float* const* q, int nt, int64_t n, float* out) {
    return with_token_count(nt, [&](auto t) { return dots16_nt<decltype(t)::value>(rows, q, n, out); });
  }

  // bfloat16 rows in pair order: 32 bytes of a row are 16 dims as two float32 vectors, the
  // even dims (the 32-bit lanes shifted left by 16) and the odd ones (their high halves), no
  // widening loads or shuffles: half the instructions of load8 per dim, so the few-token scan
  // keeps more of a memory-bound stream in flight. The query rows must be in pair order
  // (to_pair_order: per 16 dims, the 8 even ones then the 8 odd ones); n % 16 == 0.
  static constexpr bool kPairOrder = true;

  static void to_pair_order(float* q, int64_t n) {
    for (int64_t d = 0; d + 16 <= n; d += 16) {
      alignas(32) float x[16];
      std::memcpy(x, q + d, sizeof(x));
      for (int k = 0; k < 8; ++k) {
        q[d + k] = x[2 * k];
        q[d + 8 + k] = x[2 * k + 1];
      }
    }
  }

  // out[t][r] = <rows[r], q_t> for 16 bfloat16 rows and nt <= 4 query rows in pair order.
  static void dots16_pairs(const bf16_t* const* rows, const float* const* q, int nt, int64_t n, float* out) {
    return with_token_count(nt, [&](auto t) { return dots16_nt<decltype(t)::value, bf16_t, true>(rows, q, n, out); });
  }

  // tile[r * nr + t] (+)= <rows[r][0, n), q_t[k0, k0 + n)> for M rows (float32, converted)
  // and nt <= 4 query rows: the few-token tile of ExactScan::tile.
  template <int NT>
  static void dots_nt(const float* const* rows, int M, const float* const* q, int64_t k0, int64_t n, float* tile,
                      int nr, bool accumulate) {
    alignas(16) float sums[NT][2];
    for (int r = 0; r < M; r += 2) {
      const float* pair[2] = {rows[r], rows[r + 1 < M ? r + 1 : r]};
      rows_block<NT, 2>(pair, q, k0, n, &sums[0][0], 2);
      for (int rr = r; rr < r + 2 && rr < M; ++rr)
        for (int t = 0; t < NT; ++t) {
          const float s = sums[t][rr - r];
          tile[rr * nr + t] = accumulate ? tile[rr * nr + t] + s : s;
        }
    }
  }

  static void dots(const float* const* rows, int M, const float* const* q, int nt, int64_t k0, int64_t n, float* tile,
                   int nr, bool accumulate) {
    return with_token_count(
        nt, [&](auto t) { return dots_nt<decltype(t)::value>(rows, M, q, k0, n, tile, nr, accumulate); });
  }
};

struct Avx2Int8Ops {
  static constexpr int NR = 16;
  static constexpr int MR = 6;
  static constexpr int32_t kOffset = 0;

  // acc + sum over 4-byte groups of x * y as s32 lanes (the sign trick above), |x| given.
  static inline __m256i dot4(__m256i acc, __m256i abs_x, __m256i x, __m256i y, __m256i ones) {
    const __m256i prod = _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(y, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, ones));
  }

  template <int M>
  static void micro_m(const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo[M], hi[M];
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t p = 0; p < g4; ++p) {
      const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + p * 4 * NR));
      const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + p * 4 * NR + 32));
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        int32_t four;
        std::memcpy(&four, rows[r] + 4 * p, 4);
        const __m256i c = _mm256_set1_epi32(four), ac = _mm256_abs_epi8(c);
        lo[r] = dot4(lo[r], ac, c, q0, ones);
        hi[r] = dot4(hi[r], ac, c, q1, ones);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * NR), lo[r]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * NR + 8), hi[r]);
    }
  }

  static void micro(int M, const int8_t* const* rows, const int8_t* qp, int64_t g4, int32_t* tile) {
    switch (M) {
      case 1: return micro_m<1>(rows, qp, g4, tile);
      case 2: return micro_m<2>(rows, qp, g4, tile);
      case 3: return micro_m<3>(rows, qp, g4, tile);
      case 4: return micro_m<4>(rows, qp, g4, tile);
      case 5: return micro_m<5>(rows, qp, g4, tile);
      default: return micro_m<6>(rows, qp, g4, tile);
    }
  }

  // out[t][r] (stride 16 per token) = <x_r, y_t> for RB rows, each read front to back 32 bytes
  // at a time (two chains per token), the block's sums folded together.
  template <int NT, int RB>
  static inline void block(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int64_t D, int32_t* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum[NT][RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const int8_t* x = src[r];
      __m256i acc[2][NT];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = _mm256_setzero_si256();
      auto step = [&](int h, int64_t d, __m256i v) {
        const __m256i av = _mm256_abs_epi8(v);
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t)
          acc[h][t] = dot4(acc[h][t], av, v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrows + t * dpad + d)),
                           ones);
      };
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) {
        step(0, d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d)));
        step(1, d + 32, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d + 32)));
      }
      for (; d < D; d += 32) {
        if (D - d >= 32) {
          step(0, d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d)));
        } else {  // the last bytes through a zeroed copy: nothing past D is read
          alignas(32) int8_t tail[32] = {};
          std::memcpy(tail, x + d, size_t(D - d));
          step(0, d, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail)));
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) sum[t][r] = _mm256_add_epi32(acc[0][t], acc[1][t]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_sums<RB>(sum[t], out + 16 * t);
  }

  template <int NT>
  static void dots_nt(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int64_t D, int32_t* out) {
    constexpr int RB = few_rows_block<NT>();
    for (int r = 0; r < 16; r += RB) block<NT, RB>(src + r, qrows, dpad, D, out + r);
  }

  // out[t][r] = <x_r, y_t> for 16 rows and t < nt (<= 4) query rows of dpad bytes (zero past D).
  static void dots(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int nt, int64_t D, int32_t* out) {
    return with_token_count(nt, [&](auto t) { return dots_nt<decltype(t)::value>(src, qrows, dpad, D, out); });
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
