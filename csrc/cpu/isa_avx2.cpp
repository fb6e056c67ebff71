// AVX2 + FMA + F16C kernels, selected at run time (isa_select.cpp); no -march flags. The
// micro-kernel and its policy: simd_avx2.h.
//
// Standard headers are included before the target pragma so that only this file's own
// (internal-linkage) code is generated for AVX2.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(METAEMBED_OMIT_AVX2)
#define METAEMBED_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx2.h"
#endif

#include "engine.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_AVX2
namespace {

// 12 independent 8-wide FMA chains (vfmadd231ps ymm): the throughput-bound peak of the
// instruction the micro-kernel issues (latency 4 x 2 pipes = 8 chains needed).
double fma256_peak_loop(int64_t iters) {
  __m256 acc[12];
  const __m256 mul = _mm256_set1_ps(0.999999f), add = _mm256_set1_ps(1e-7f);
#pragma GCC unroll 12
  for (int r = 0; r < 12; ++r) acc[r] = _mm256_set1_ps(float(r));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int r = 0; r < 12; ++r) acc[r] = _mm256_fmadd_ps(acc[r], mul, add);
  }
  __m256 sum = acc[0];
#pragma GCC unroll 12
  for (int r = 1; r < 12; ++r) sum = _mm256_add_ps(sum, acc[r]);
  float out[8];
  _mm256_storeu_ps(out, sum);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 12 * 8 * 2;
}

}  // namespace

const IsaKernels* avx2_kernels() {
  static const IsaKernels kernels = [] {
    IsaKernels k{};
    k.name = "avx2";
    k.nr = Avx2Policy::NR;
    k.mr = Avx2Policy::MR;
    const DType reduced[] = {kF32, kF16, kBF16};
    for (DType d : reduced) k.by_dtype[d] = kernel_set_for<Avx2Policy>(d);
    k.peak_fp32 = k.peak_bf16 = PeakLoop{fma256_peak_loop, "256-bit FMA (ymm)"};  // bf16 is widened to fp32
    return k;
  }();
  return &kernels;
}

#else
const IsaKernels* avx2_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_AVX2
#pragma GCC pop_options
#endif
