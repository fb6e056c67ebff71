// Run-time choice of the CPU kernels' instruction set: the best one this CPU supports,
// or METAEMBED_CPU_ISA (generic | avx2 | avx512 | avx512_bf16 | amx) at load time, or set_active_isa().
#include <atomic>
#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa_select.h"

namespace metaembed {
namespace cpu {
namespace {

// AMX-TILE and AMX-BF16 (CPUID.(7, 0):EDX bits 24 and 22), and the tile data state granted to
// this process: Linux (5.16+) enables it per process on request (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without the grant a tile instruction faults. Asked once; torch's oneDNN
// asks the same.
bool amx_usable() {
#if defined(__GNUC__) && defined(__linux__) && defined(__x86_64__)
  static const bool usable = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx >> 24 & 1u) || !(edx >> 22 & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

bool cpu_has(const char* isa) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(isa, "avx512") == 0)
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx512_bf16") == 0) return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (std::strcmp(isa, "amx") == 0) return cpu_has("avx512") && amx_usable();
#endif
  return std::strcmp(isa, "generic") == 0;
}

const IsaKernels* by_name(const char* name) {
  if (std::strcmp(name, "generic") == 0) return generic_kernels();
  if (std::strcmp(name, "avx2") == 0) return cpu_has("avx2") ? avx2_kernels() : nullptr;
  if (std::strcmp(name, "avx512") == 0) return cpu_has("avx512") ? avx512_kernels() : nullptr;
  if (std::strcmp(name, "avx512_bf16") == 0) return cpu_has("avx512_bf16") ? avx512bf16_kernels() : nullptr;
  if (std::strcmp(name, "amx") == 0) return cpu_has("amx") ? amx_kernels() : nullptr;
  return nullptr;
}

// vdpbf16ps does 32 bf16 multiply-adds per zmm instruction against an FMA's 16 fp32 ones, but
// how fast a core issues it decides whether consuming bf16 natively pays. AMD's Zen 4/5 issue it
// like an FMA: twice the FLOPs (bf16 467 vs fp32 233 GFLOP/s on a 2-core EPYC, `_C.peak_gflops`).
// An Intel Xeon with AVX512-FP16 issues it at half the FMA's FLOPs (bf16 176 vs fp32 360 GFLOP/s
// on 2 cores), so there the avx512 kernels, which widen bf16 to fp32 (exact) for the FMA
// micro-kernel, run bf16 twice as fast (MaxSim (1, 1), 256 x 20k queries x candidates: 3.9 vs
// 7.7 ms). Other Intel cores with AVX512-BF16 are assumed alike (not measured; the test
// test_default_isa_runs_bf16_on_the_faster_instruction checks the rule on the machine it runs
// on). A fixed rule rather than a timing probe at load keeps the choice, and so the results'
// rounding, the same on every run of one machine. METAEMBED_CPU_ISA overrides it.
bool bf16_dot_outruns_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amd = ebx == 0x68747541u && edx == 0x69746e65u && ecx == 0x444d4163u;  // "AuthenticAMD"
  return amd;
#else
  return false;
#endif
}

// AMX first: its bf16 tiles do 16 x 16 x 32 multiply-adds per instruction (fp32 and fp16 run
// the avx512 kernels there).
const IsaKernels* best() {
  if (const IsaKernels* k = by_name("amx")) return k;
  if (bf16_dot_outruns_fma())
    if (const IsaKernels* k = by_name("avx512_bf16")) return k;
  for (const char* name : {"avx512", "avx2", "generic"})
    if (const IsaKernels* k = by_name(name)) return k;
  return generic_kernels();
}

std::atomic<const IsaKernels*>& active() {
  static std::atomic<const IsaKernels*> current{[] {
    const char* env = std::getenv("METAEMBED_CPU_ISA");
    if (env && *env && std::strcmp(env, "auto") != 0)
      if (const IsaKernels* k = by_name(env)) return k;
    return best();
  }()};
  return current;
}

}  // namespace

const IsaKernels* active_kernels() { return active().load(); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"generic", "avx2", "avx512", "avx512_bf16", "amx"})
    if (by_name(name)) out.emplace_back(name);
  return out;
}

bool set_active_isa(const char* name) {
  const IsaKernels* k = std::strcmp(name, "auto") == 0 ? best() : by_name(name);
  if (!k) return false;
  active().store(k);
  return true;
}

}  // namespace cpu
}  // namespace metaembed
