"""CPU benchmarks: our cpu backend against the reference einsum, the BLAS ceiling and peers."""
import pytest
import torch

from workloads import PROVIDERS, WORKLOADS, Unavailable, get_callable, make_inputs, peak_extra_memory_mb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAXSIM_PROVIDERS = [p for p in PROVIDERS if p not in ("triton", "cuda")]
CASES = [
    pytest.param(w, dt, p, id=f"{w}-{dt}-{p}")
    for w in ("W0", "W1", "W2", "W3", "W4", "W5", "L1")
    for dt in DTYPES
    for p in (MAXSIM_PROVIDERS if WORKLOADS[w].kind == "maxsim" else ["cpu", "reference"])
]


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_calibration_peak(benchmark, peaks, kind):
    """The calibration providers: GFLOP/s of independent chains of the instruction our
    kernels issue for fp32 / bf16 on this ISA, on every torch thread."""
    from metaembed_kernels import _extension

    dtype = {"fp32": "float32", "bf16": "bfloat16"}[kind]
    if not peaks.get(dtype, {}).get("gflops"):
        pytest.skip(f"no {kind} calibration loop for cpu isa {_extension.cpu_isa()}")
    benchmark.extra_info.update(peak_gflops=peaks[dtype]["gflops"], instruction=peaks[dtype]["instruction"],
                                threads=torch.get_num_threads())
    benchmark.pedantic(_extension._C.peak_gflops, args=(kind, 0, 0.05), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("workload,dtype,provider", CASES)
def test_bench(benchmark, peaks, workload, dtype, provider):
    w = WORKLOADS[workload]
    x = make_inputs(w, DTYPES[dtype])
    try:
        fn = get_callable(provider, w, DTYPES[dtype], x)
    except Unavailable as err:
        pytest.skip(str(err))
    benchmark.group = f"{workload}-{dtype}"
    benchmark.extra_info.update(workload=workload, dtype=dtype, provider=provider, flops=w.flops)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = w.flops / median / 1e9
    peak = peaks.get(dtype, {}).get("gflops")
    if peak:
        benchmark.extra_info["fraction_of_peak"] = w.flops / median / 1e9 / peak
    if w.kind == "loss":  # working memory of one forward+backward, in a fresh process
        benchmark.extra_info["peak_extra_memory_mb"] = peak_extra_memory_mb(
            provider, w, dtype, torch.get_num_threads()
        )
