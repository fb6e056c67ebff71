// AVX2 + FMA + F16C policy, included by isa_avx2.cpp and index_isa_avx2.cpp after their target
// pragmas (it has internal linkage, like engine.h).
//
// Micro-kernel: a 6 x 16 register tile, rows = 6 candidate tokens, lanes = 16 query
// tokens (two ymm). Per step of d: 2 loads of packed query lanes, 6 broadcasts of
// c[j, d], 12 FMAs into 12 accumulators; 15 of the 16 ymm registers are live, and the
// 12 independent accumulators cover the FMA latency x throughput product (4 x 2) of
// current x86 cores with room to spare.
#pragma once
#include "engine.h"

namespace metaembed {
namespace cpu {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

struct Avx2Policy : AccPacking<float, 16> {
  using Acc = float;
  static constexpr int NR = 16;
  static constexpr int MR = 6;

  // A 1-row tile (r_c = 1, or the last token of r_c = MR k + 1) would leave only two
  // accumulators to cover the FMA latency, so D is split across S = 4 interleaved
  // accumulator sets, summed at the end. Every taller tile accumulates each element as one
  // sequential FMA chain over D, whatever its height: an element's value is then the same
  // in every layout and tiling (engine.h, candidate lanes), so a saved argmax equals the
  // backward's recompute, near-ties included. (ops_cpu.cpp's choose_blocking keeps the
  // candidate-lane layout away from budgets with a 1-row tail tile: r_c = 1 has no choice of j.)
  template <int M>
  static inline void micro(const float* const* rows, const float* qp, int64_t kc, float* tile, bool accumulate) {
    micro_epilogue<M>(rows, qp, kc, tile, accumulate, [tile](int r, const __m256* v) {
      _mm256_storeu_ps(tile + r * NR, v[0]);
      _mm256_storeu_ps(tile + r * NR + 8, v[1]);
    });
  }

  // The micro-kernel with its last step left to the caller: epi(r, v) receives row r's
  // finished lanes in registers, v[h] = lanes [8 h, 8 h + 8). `tile` is read only to accumulate.
  template <int M, class Epilogue>
  static inline void micro_epilogue(const float* const* rows, const float* qp, int64_t kc, const float* tile,
                                    bool accumulate, Epilogue&& epi) {
    constexpr int S = M == 1 ? 4 : 1;
    __m256 lo[S][M], hi[S][M];
    const float* rp[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      rp[r] = rows[r];
      lo[0][r] = accumulate ? _mm256_loadu_ps(tile + r * NR) : _mm256_setzero_ps();
      hi[0][r] = accumulate ? _mm256_loadu_ps(tile + r * NR + 8) : _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) lo[s][r] = hi[s][r] = _mm256_setzero_ps();
    }
    int64_t k = 0;
#pragma GCC unroll 2
    for (; k + S <= kc; k += S) {
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        const __m256 q0 = _mm256_loadu_ps(qp + (k + s) * NR);
        const __m256 q1 = _mm256_loadu_ps(qp + (k + s) * NR + 8);
#pragma GCC unroll 8
        for (int r = 0; r < M; ++r) {
          const __m256 c = _mm256_broadcast_ss(&rp[r][k + s]);
          lo[s][r] = _mm256_fmadd_ps(c, q0, lo[s][r]);
          hi[s][r] = _mm256_fmadd_ps(c, q1, hi[s][r]);
        }
      }
    }
    for (; k < kc; ++k) {
      const __m256 q0 = _mm256_loadu_ps(qp + k * NR);
      const __m256 q1 = _mm256_loadu_ps(qp + k * NR + 8);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 c = _mm256_broadcast_ss(&rp[r][k]);
        lo[0][r] = _mm256_fmadd_ps(c, q0, lo[0][r]);
        hi[0][r] = _mm256_fmadd_ps(c, q1, hi[0][r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s) {
        lo[0][r] = _mm256_add_ps(lo[0][r], lo[s][r]);
        hi[0][r] = _mm256_add_ps(hi[0][r], hi[s][r]);
      }
      const __m256 v[2] = {lo[0][r], hi[0][r]};
      epi(r, v);
    }
  }

  // Engine::score_candidate's running max without argmax on the registers (as
  // Avx512Policy::MaxFold, with the NaN lanes kept as a vector mask): lanes [0, 16) of a panel.
  static constexpr bool kFoldMax = true;
  struct MaxFold {
    __m256 m0, m1, nan0 = _mm256_setzero_ps(), nan1 = _mm256_setzero_ps();
    explicit MaxFold(const float* runmax) : m0(_mm256_loadu_ps(runmax)), m1(_mm256_loadu_ps(runmax + 8)) {}
    void fold(const __m256* v) {
      nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps(v[0], v[0], _CMP_UNORD_Q));
      nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(v[1], v[1], _CMP_UNORD_Q));
      m0 = _mm256_max_ps(v[0], m0);  // v > m ? v : m; a NaN m stays
      m1 = _mm256_max_ps(v[1], m1);
    }
    void store(float* runmax) const {
      const __m256 nan = _mm256_set1_ps(__builtin_nanf(""));
      _mm256_storeu_ps(runmax, _mm256_blendv_ps(m0, nan, nan0));
      _mm256_storeu_ps(runmax + 8, _mm256_blendv_ps(m1, nan, nan1));
    }
  };

  // With the argmax (as Avx512Policy::ArgmaxFold): take where !(S <= m) and m is not NaN, or
  // unconditionally on the candidate's first valid row.
  struct ArgmaxFold {
    __m256 m0, m1;
    __m256i i0, i1;
    ArgmaxFold(const float* runmax, const int32_t* runidx)
        : m0(_mm256_loadu_ps(runmax)), m1(_mm256_loadu_ps(runmax + 8)),
          i0(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(runidx))),
          i1(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(runidx + 8))) {}
    static void take(__m256 v, int32_t j, bool first, __m256& m, __m256i& i) {
      const __m256 k = first ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                             : _mm256_and_ps(_mm256_cmp_ps(v, m, _CMP_NLE_UQ), _mm256_cmp_ps(m, m, _CMP_ORD_Q));
      m = _mm256_blendv_ps(m, v, k);
      i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i), _mm256_castsi256_ps(_mm256_set1_epi32(j)), k));
    }
    void fold(const __m256* v, int32_t j, bool first) {
      take(v[0], j, first, m0, i0);
      take(v[1], j, first, m1, i1);
    }
    void store(float* runmax, int32_t* runidx) const {
      _mm256_storeu_ps(runmax, m0);
      _mm256_storeu_ps(runmax + 8, m1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(runidx), i0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(runidx + 8), i1);
    }
  };

  template <class T>
  static void convert(const T* src, float* dst, int64_t n) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
    for (; k < n; ++k) dst[k] = scalar_to_float(src[k]);
  }

  template <class T>
  static void axpy(float w, const T* x, float* y, int64_t n) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(wv, load8(x + k), _mm256_loadu_ps(y + k)));
    for (; k < n; ++k) y[k] += w * scalar_to_float(x[k]);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace metaembed
