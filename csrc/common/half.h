// IEEE fp16 <-> fp32 and fp32 -> bf16 by bit manipulation, for code that has no hardware
// conversion at hand: the portable CPU kernels and the CUDA emulator. Integer arithmetic only,
// so neither FMA contraction nor the FPU's flush modes can change a result.
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

// fp32 -> fp16, round to nearest even (torch's .to(torch.float16)): overflow to inf, results
// below half the smallest subnormal to zero, NaN to the quiet NaN 0x7e00 with the sign kept.
constexpr uint16_t f32_to_f16_bits(uint32_t x) {
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (inf included) rounds to inf
  if (x >= 0x38800000u) {                       // normal half: rebias the exponent, round 13 bits
    uint32_t h = (x >> 13) - (uint32_t(112) << 10);
    const uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  const uint32_t exp = x >> 23;                 // subnormal half: value = mant * 2^(exp - 150)
  if (exp < 102) return sign;                   // below 2^-25: zero (2^-25 itself ties to 0)
  const uint32_t mant = (x & 0x7fffffu) | 0x800000u, shift = 126 - exp;  // 14..24
  uint32_t h = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal: right
  return uint16_t(sign | h);
}

// fp32 -> bf16, round to nearest even (torch's .to(torch.bfloat16)); a NaN keeps its sign and
// top payload bits and is made quiet, as torch's vectorised conversion of a tensor does.
constexpr uint16_t f32_to_bf16_bits(uint32_t x) {
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace
}  // namespace metaembed
