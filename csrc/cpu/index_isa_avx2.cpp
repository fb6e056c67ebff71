// Index kernels for AVX2 + FMA + F16C, selected at run time (index_ops.cpp).
//
// int8: no VNNI here, so the integer dots use VPMADDUBSW (u8 x s8 -> saturating s16 pairs)
// with the sign trick: |x| (<= 128 as u8) times y * sign(x) (|y| <= 127), so a pair sums to at
// most 2 * 128 * 127 = 32512 and never saturates; VPMADDWD with ones widens to s32. Candidate
// bytes are used as they are (no bias, QInfo::corr = 0). Query panels are [ceil(D/4)][16][4].
// float32 / bfloat16 go through the engine's AVX2 policy (simd_avx2.h, the 6 x 16 ymm tile).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#define METAEMBED_INDEX_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx2.h"
#include "index_engine.h"
#endif

#include "index_kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_INDEX_AVX2
namespace {

struct Avx2Int8Ops {
  static constexpr int NR = 16;
  static constexpr int MR = 6;
  static constexpr int32_t kOffset = 0;

  static inline __m256i dot4(__m256i acc, __m256i c, __m256i q, __m256i ones) {
    const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(q, c));
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
        const __m256i c = _mm256_set1_epi32(four);
        lo[r] = dot4(lo[r], c, q0, ones);
        hi[r] = dot4(hi[r], c, q1, ones);
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

  static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }

  // out[t][r] = <x_r, y_t> for 16 rows and t < nt query rows of dpad bytes (zero past D).
  static void dots(const int8_t* const* src, const int8_t* qrows, int64_t dpad, int nt, int64_t D, int32_t* out) {
    constexpr int M = 16;
    const __m256i ones = _mm256_set1_epi16(1);
    alignas(32) int8_t tail[32];
    for (int r = 0; r < M; ++r) {
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      for (int64_t d = 0; d < D; d += 32) {
        __m256i x;
        if (d + 32 <= D) {
          x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + d));
        } else {
          std::memset(tail, 0, sizeof(tail));
          std::memcpy(tail, src[r] + d, size_t(D - d));
          x = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
        for (int t = 0; t < nt; ++t)
          acc[t] = dot4(acc[t], x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrows + t * dpad + d)), ones);
      }
      for (int t = 0; t < nt; ++t) out[t * M + r] = hsum(acc[t]);
    }
  }
};

}  // namespace

const IndexIsaKernels* index_avx2_kernels() {
  static const IndexIsaKernels kernels = [] {
    IndexIsaKernels k{};
    k.name = "avx2";
    k.f32 = ExactScan<Avx2Policy, float, UseEngineDots>::kernel_set();
    k.bf16 = ExactScan<Avx2Policy, bf16_t, UseEngineDots>::kernel_set();
    k.int8 = Int8Scan<Avx2Int8Ops>::kernel_set();
    return k;
  }();
  return &kernels;
}
#else
const IndexIsaKernels* index_avx2_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_INDEX_AVX2
#pragma GCC pop_options
#endif
