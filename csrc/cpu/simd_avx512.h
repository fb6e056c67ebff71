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

struct Avx512Policy : AccPacking<float, 32> {
  using Acc = float;
  static constexpr int NR = 32;
  static constexpr int MR = 8;

  // Tiles of fewer than 4 rows (tiny budgets such as r_c = 1) would leave too few
  // independent accumulators to cover the FMA latency, so D is split across S
  // interleaved accumulator sets, summed at the end.
  template <int M>
  static inline void micro(const float* const* rows, const float* qp, int64_t kc, float* tile, bool accumulate) {
    constexpr int S = M >= 4 ? 1 : (M == 1 ? 4 : 2);
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
    int64_t k = 0;
#pragma GCC unroll 2
    for (; k + S <= kc; k += S) {
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
    }
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
      _mm512_storeu_ps(tile + r * NR, lo[0][r]);
      _mm512_storeu_ps(tile + r * NR + 16, hi[0][r]);
    }
  }

  template <class T>
  static void convert(const T* src, float* dst, int64_t n) {
    int64_t k = 0;
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
