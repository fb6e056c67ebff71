// Index kernels for AVX512-BF16: bfloat16 candidates consumed in place by VDPBF16PS (the
// engine's Avx512Bf16Policy, simd_avx512bf16.h) in the micro-kernel path; float32 and int8
// (and the bf16 few-token dots) as in index_isa_avx512.cpp.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 10) && !defined(METAEMBED_OMIT_AVX512_BF16)
#define METAEMBED_INDEX_AVX512BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx512bf16.h"
#include "index_engine.h"
#include "index_simd_avx512.h"
#endif

#include "index_kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_INDEX_AVX512BF16
const IndexIsaKernels* index_avx512bf16_kernels() {
  static const IndexIsaKernels kernels = [] {
    const IndexIsaKernels* base = index_avx512_kernels();
    IndexIsaKernels k = base ? *base : IndexIsaKernels{};
    k.name = "avx512_bf16";
    k.bf16 = ExactScan<Avx512Bf16Policy, bf16_t, Avx512Dots>::kernel_set();
    k.bf16_wide = ExactScan<Avx512Bf16WidePolicy, bf16_t, Avx512Dots>::kernel_set();
    return k;
  }();
  return &kernels;
}
#else
const IndexIsaKernels* index_avx512bf16_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_INDEX_AVX512BF16
#pragma GCC pop_options
#endif
