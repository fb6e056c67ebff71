// AMX-BF16 kernels (simd_amx.h): bf16 candidates against query panels on TDPBF16PS tiles; every
// other path, and fp32 / fp16 inputs, are the avx512 kernels'. Chosen by default where the CPU
// has AMX-BF16 and the kernel grants this process the tile data state (isa_select.cpp).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 11) && !defined(METAEMBED_OMIT_AMX)
#define METAEMBED_AMX 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,amx-tile,amx-bf16")
#include <immintrin.h>
#include "simd_amx.h"
#endif

#include "kernels.h"

namespace metaembed {
namespace cpu {

#if METAEMBED_AMX
namespace {

// Independent TDPBF16PS into 4 accumulator tiles (A and B loaded once): 16 x 16 x 32 bf16
// multiply-adds each, 16,384 floating-point operations per instruction.
double amx_bf16_peak_loop(int64_t iters) {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
  };
  static const Config config{};
  alignas(64) static const uint16_t ones[16 * 32] = {};  // zeros: the values do not matter
  alignas(64) float out[16 * 16];
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 4 * 16 * 16 * 32 * 2;
}

}  // namespace

const IsaKernels* amx_kernels() {
  if (!avx512_kernels()) return nullptr;
  static const IsaKernels kernels = [] {
    const IsaKernels* base = avx512_kernels();
    IsaKernels k = *base;  // fp32 and fp16: the avx512 kernels themselves
    k.name = "amx";
    k.by_dtype[kBF16] = kernel_set_for<AmxPolicy>(kBF16);
    k.peak_bf16 = PeakLoop{amx_bf16_peak_loop, "AMX TDPBF16PS (16 x 16 x 32 tiles)"};
    return k;
  }();
  return &kernels;
}
#else
const IsaKernels* amx_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace metaembed

#if METAEMBED_AMX
#pragma GCC pop_options
#endif
