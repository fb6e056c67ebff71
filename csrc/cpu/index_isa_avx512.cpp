// Index kernels for AVX-512 (F, BW, VL, DQ) + AVX512-VNNI, selected at run time
// (index_ops.cpp): float32 and bfloat16 through the engine's Avx512Policy, int8 through
// VPDPBUSD. No -march flags: the target pragma covers only this file's (internal) code.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(METAEMBED_OMIT_AVX512)
#define METAEMBED_INDEX_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#include "simd_avx512.h"
#include "index_engine.h"
#include "index_simd_avx512.h"
#endif

#include "index_kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_INDEX_AVX512
const IndexIsaKernels* index_avx512_kernels() {
  static const IndexIsaKernels kernels = [] {
    IndexIsaKernels k{};
    k.name = "avx512";
    k.f32 = ExactScan<Avx512Policy, float, Avx512Dots>::kernel_set();
    k.bf16 = ExactScan<Avx512Policy, bf16_t, Avx512Dots>::kernel_set();
    k.int8 = Int8Scan<VnniInt8Ops>::kernel_set();
    k.int8_narrow = Int8Scan<VnniInt8NarrowOps>::kernel_set();
    return k;
  }();
  return &kernels;
}
#else
const IndexIsaKernels* index_avx512_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_INDEX_AVX512
#pragma GCC pop_options
#endif
