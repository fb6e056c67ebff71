"""The benchmarks' peak (`_C.peak_gflops`, benchmarks/summary.py): measured with the
instruction the selected ISA's micro-kernel issues, separately for fp32 and bf16, so that
no kernel's "% of peak" can exceed 100% except by noise."""
import time

import pytest
import torch

from helpers import requires_extension
from metaembed_kernels import DEFAULT_GROUPS, _extension, maxsim_grouped

pytestmark = requires_extension

INSTRUCTION = {  # (isa, dtype) -> what its micro-kernel spends its time in
    ("avx2", "fp32"): "256-bit FMA", ("avx2", "bf16"): "256-bit FMA",
    ("avx512", "fp32"): "512-bit FMA", ("avx512", "bf16"): "512-bit FMA",
    ("avx512_bf16", "fp32"): "512-bit FMA", ("avx512_bf16", "bf16"): "vdpbf16ps",
    ("amx", "fp32"): "512-bit FMA", ("amx", "bf16"): "TDPBF16PS",
}


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_peak_times_the_micro_kernels_instruction(cpu_isa, kind):
    name = _extension._C.peak_instruction(kind)
    if cpu_isa == "generic":
        assert name == "none" and _extension._C.peak_gflops(kind, 1, 0.01) == 0.0
        return
    assert INSTRUCTION[(cpu_isa, kind)] in name, name
    assert _extension._C.peak_gflops(kind, 1, 0.01) > 0
    with pytest.raises(ValueError, match="dtype must be"):
        _extension._C.peak_gflops("fp64")


def _best_of(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_kernel_runs_above_its_peak(cpu_isa, dtype, num_threads):
    """A compute-bound MaxSim (16 x 16 queries, 600 x 64 candidates, D = 128: 2.5 GFLOP)
    on one thread must not run faster than the peak of its dtype on this ISA (before the
    peaks were per ISA and dtype, bf16 on avx512_bf16 ran at 145-174% of the fp32 FMA
    peak). Kernel and peak are interleaved and each taken at its best; a busy neighbour
    only slows the kernel's longer calls more than the peak's short windows."""
    if cpu_isa == "generic":
        pytest.skip("no calibration loop for the generic kernels")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(16, 16, 128, generator=gen).to(dtype)
    c = torch.randn(600, 64, 128, generator=gen).to(dtype)
    flops = 2.0 * 16 * 600 * 16 * 64 * 128
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cpu")  # warm-up
    kernel, peak = 0.0, 0.0
    for _ in range(3):
        peak = max(peak, _extension._C.peak_gflops(kind, 1, 0.05))
        kernel = max(kernel, flops / _best_of(lambda: maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cpu"), 2) / 1e9)
    assert kernel <= 1.1 * peak, f"{cpu_isa} {kind}: kernel {kernel:.1f} GFLOP/s above the peak {peak:.1f}"


def test_default_isa_runs_bf16_on_the_faster_instruction():
    """Where AVX512-BF16 or AMX exists, the default ISA must be the one whose bf16 micro-kernel
    instruction does the most FLOPs on this core: AMX tiles (amx) where the CPU and the kernel
    allow them; else vdpbf16ps (avx512_bf16) on AMD Zen 4/5, where it runs at twice the FMA's
    FLOPs, and widened fp32 FMAs (avx512) on Intel, where the Xeon measured runs it at half
    (isa_select.cpp). Peaks are taken at their best of three interleaved short windows; the
    candidates differ by 2x or more, so the 0.8 margin only absorbs noise. ("auto" is the rule
    itself, whatever METAEMBED_CPU_ISA forced at load.)"""
    candidates = [isa for isa in ("amx", "avx512_bf16", "avx512") if isa in _extension.supported_cpu_isas()]
    if not {"amx", "avx512_bf16"} & set(candidates):
        pytest.skip("neither AMX nor AVX512-BF16 on this CPU")
    previous = _extension.set_cpu_isa("auto")
    try:
        chosen = _extension.cpu_isa()
        assert chosen in candidates, chosen
        if "amx" in candidates:
            assert chosen == "amx", chosen
        best = {isa: 0.0 for isa in candidates}
        for _ in range(3):
            for isa in best:
                _extension.set_cpu_isa(isa)
                best[isa] = max(best[isa], _extension._C.peak_gflops("bf16", 1, 0.02))
    finally:
        _extension.set_cpu_isa(previous)
    assert best[chosen] >= 0.8 * max(best.values()), f"default {chosen} runs bf16 at {best}"
