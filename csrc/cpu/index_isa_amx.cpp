// Index kernels for AMX-BF16: bfloat16 candidates on TDPBF16PS tiles (the engine's AmxPolicy,
// simd_amx.h) in the multi-candidate tile paths, (1, 1)'s fused threshold test included;
// float32 and int8, and the bf16 few-token dots and 16 x 16 tiles, as in index_isa_avx512.cpp.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 11) && !defined(METAEMBED_OMIT_AMX)
#define METAEMBED_INDEX_AMX 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-bf16")
#include <immintrin.h>
#include "simd_amx.h"
#include "index_engine.h"
#include "index_simd_avx512.h"
#endif

#include "index_kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_INDEX_AMX
const IndexIsaKernels* index_amx_kernels() {
  static const IndexIsaKernels kernels = [] {
    const IndexIsaKernels* base = index_avx512_kernels();
    IndexIsaKernels k = base ? *base : IndexIsaKernels{};
    k.name = "amx";
    k.bf16 = ExactScan<AmxPolicy, bf16_t, Avx512Dots>::kernel_set();
    return k;
  }();
  return &kernels;
}
#else
const IndexIsaKernels* index_amx_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_INDEX_AMX
#pragma GCC pop_options
#endif
