// Index kernels for AVX2 + FMA + F16C, selected at run time (index_ops.cpp): float32 and
// bfloat16 through the engine's AVX2 policy (simd_avx2.h, the 6 x 16 ymm tile) with the
// few-token dots of index_simd_avx2.h, int8 through its VPMADDUBSW kernels (Avx2Int8Ops).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(METAEMBED_OMIT_AVX2)
#define METAEMBED_INDEX_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx2.h"
#include "index_engine.h"
#include "index_simd_avx2.h"
#endif

#include "index_kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_INDEX_AVX2
static_assert(ops_pair_order<Avx2Dots>() && !ops_pair_order<UseEngineDots>(), "bfloat16 pair order on AVX2 only");

const IndexIsaKernels* index_avx2_kernels() {
  static const IndexIsaKernels kernels = [] {
    IndexIsaKernels k{};
    k.name = "avx2";
    k.f32 = ExactScan<Avx2Policy, float, Avx2Dots>::kernel_set();
    k.bf16 = ExactScan<Avx2Policy, bf16_t, Avx2Dots>::kernel_set();
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
