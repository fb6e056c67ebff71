// Test-only build of ops_cuda.cpp against the emulated kernels: registers the ops as
// metaembed_emu::* for CPU tensors (see kernels_emu.cpp).
#ifndef METAEMBED_CUDA_EMULATE
#define METAEMBED_CUDA_EMULATE
#endif
#include "../ops_cuda.cpp"
