// Portable kernels: the engine with plain loops (vectorised by the compiler for the
// baseline ISA). Also the only float64 path (used for gradcheck-grade verification).
#include "engine.h"

namespace metaembed {
namespace cpu {

const IsaKernels* generic_kernels() {
  static const IsaKernels kernels = [] {
    IsaKernels k{};
    k.name = "generic";
    k.nr = GenericPolicy<float>::NR;
    k.mr = GenericPolicy<float>::MR;
    static_assert(GenericPolicy<double>::NR == GenericPolicy<float>::NR, "one panel width per ISA");
    const DType reduced[] = {kF32, kF16, kBF16};
    for (DType d : reduced) k.by_dtype[d] = kernel_set_for<GenericPolicy<float>>(d);
    k.by_dtype[kF64] = Engine<GenericPolicy<double>, double>::kernel_set();
    return k;
  }();
  return &kernels;
}

}  // namespace cpu
}  // namespace metaembed
