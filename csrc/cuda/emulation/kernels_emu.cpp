// Test-only build of kernels.cu as plain C++ on the CPU emulator (emulate.h). Not part of
// the extension: tests/test_cuda.py compiles this file and ops_emu.cpp on demand.
#ifndef METAEMBED_CUDA_EMULATE
#define METAEMBED_CUDA_EMULATE
#endif
#include "../kernels.cu"
