// Portable index kernels: the engine's scalar policy and scalar integer dots (vectorised by
// the compiler for the baseline ISA). The fallback on every CPU, and the reference the
// SIMD variants are tested against.
#include "engine.h"
#include "index_engine.h"

namespace metaembed {
namespace cpu {

const IndexIsaKernels* index_generic_kernels() {
  static const IndexIsaKernels kernels = [] {
    IndexIsaKernels k{};
    k.name = "generic";
    k.f32 = ExactScan<GenericPolicy<float>, float, UseEngineDots>::kernel_set();
    k.bf16 = ExactScan<GenericPolicy<float>, bf16_t, UseEngineDots>::kernel_set();
    k.int8 = Int8Scan<GenericInt8Ops>::kernel_set();
    return k;
  }();
  return &kernels;
}

}  // namespace cpu
}  // namespace metaembed
