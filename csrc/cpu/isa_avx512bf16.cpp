// AVX-512 + AVX512-BF16 kernels: bf16 inputs are consumed as bf16 by VDPBF16PS, which
// multiplies pairs of bf16 and accumulates both products into fp32 lanes:
//
//     acc[l] += q[l][2p] * c[j][2p] + q[l][2p+1] * c[j][2p+1]
//
// (bf16 x bf16 products are exact in fp32; the instruction rounds to nearest-even and
// flushes denormals). Queries are packed as bf16 pairs [d/2][lane][2]; candidate rows
// are read in place, two dims per 32-bit broadcast, so no conversion pass is needed and
// each instruction does twice the multiply-adds of an fp32 FMA. An odd D ends with a
// single-element step against the zero-padded last pair. fp32/fp16 inputs use the
// plain AVX-512 kernels.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 10) && !defined(METAEMBED_OMIT_AVX512_BF16)
#define METAEMBED_AVX512BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx512bf16.h"
#endif

#include "kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_AVX512BF16
namespace {

// 16 independent chains of VDPBF16PS zmm: 16 lanes x 2 bf16 products, each multiplied and
// added, so 64 floating-point operations per instruction (twice an fp32 FMA's).
double dpbf16_peak_loop(int64_t iters) {
  __m512 acc[16];
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3a83);  // bf16(1e-3)
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16(1)
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_set1_ps(float(r));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], a, b);
  }
  __m512 sum = acc[0];
#pragma GCC unroll 16
  for (int r = 1; r < 16; ++r) sum = _mm512_add_ps(sum, acc[r]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return double(iters) * 16 * 16 * 4;
}

}  // namespace

const IsaKernels* avx512bf16_kernels() {
  static const IsaKernels kernels = [] {
    const IsaKernels* base = avx512_kernels();
    IsaKernels k = base ? *base : IsaKernels{};
    k.name = "avx512_bf16";
    k.nr = Avx512Bf16Policy::NR;
    k.mr = Avx512Bf16Policy::MR;
    k.by_dtype[kBF16] = Engine<Avx512Bf16Policy, bf16_t>::kernel_set();
    k.peak_bf16 = PeakLoop{dpbf16_peak_loop, "512-bit vdpbf16ps (zmm)"};  // fp32: avx512's FMA
    return k;
  }();
  return &kernels;
}
#else
const IsaKernels* avx512bf16_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_AVX512BF16
#pragma GCC pop_options
#endif
