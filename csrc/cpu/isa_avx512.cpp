// AVX-512 (F, BW, VL, DQ) kernels, selected at run time; fp32 and fp16 inputs (and bf16
// on CPUs without AVX512-BF16) through the fp32 zmm micro-kernel of simd_avx512.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
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
const IsaKernels* avx512_kernels() {
  static const IsaKernels kernels = [] {
    IsaKernels k{};
    k.name = "avx512";
    k.nr = Avx512Policy::NR;
    k.mr = Avx512Policy::MR;
    const DType reduced[] = {kF32, kF16, kBF16};
    for (DType d : reduced) k.by_dtype[d] = kernel_set_for<Avx512Policy>(d);
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
