// AVX-512 (F, BW, VL, DQ) kernels, selected at run time; fp32 and fp16 inputs (and bf16
// on CPUs without AVX512-BF16) through the fp32 zmm micro-kernel of simd_avx512.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(METAEMBED_OMIT_AVX512)
#define METAEMBED_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx512.h"
#endif

#include "kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_AVX512
namespace {

// 16 independent 16-wide FMA chains (vfmadd231ps zmm), the micro-kernel's instruction.
double fma512_peak_loop(int64_t iters) {
  __m512 acc[16];
  const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-7f);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_set1_ps(float(r));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(acc[r], mul, add);
  }
  __m512 sum = acc[0];
#pragma GCC unroll 16
  for (int r = 1; r < 16; ++r) sum = _mm512_add_ps(sum, acc[r]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return double(iters) * 16 * 16 * 2;
}

}  // namespace

const IsaKernels* avx512_kernels() {
  static const IsaKernels kernels = [] {
    IsaKernels k{};
    k.name = "avx512";
    k.nr = Avx512Policy::NR;
    k.mr = Avx512Policy::MR;
    const DType reduced[] = {kF32, kF16, kBF16};
    for (DType d : reduced) k.by_dtype[d] = kernel_set_for<Avx512Policy>(d);
    k.peak_fp32 = k.peak_bf16 = PeakLoop{fma512_peak_loop, "512-bit FMA (zmm)"};  // bf16 is widened to fp32
    return k;
  }();
  return &kernels;
}
#else
const IsaKernels* avx512_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_AVX512
#pragma GCC pop_options
#endif
