// IEEE fp16 -> fp32 by bit manipulation (exact; subnormals renormalised), for code that has
// no hardware conversion at hand: the portable CPU kernels and the CUDA emulator.
// Internal linkage: included by translation units built for different instruction sets.
#pragma once
#include <cstdint>

namespace metaembed {
namespace {

constexpr uint32_t f16_to_f32_bits(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return sign;
    uint32_t e = 113;  // subnormal: shift the leading one into the implicit bit
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    return sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  if (exp == 31) return sign | 0x7f800000u | (mant << 13);  // inf / nan
  return sign | ((exp + 112) << 23) | (mant << 13);
}

}  // namespace
}  // namespace metaembed
