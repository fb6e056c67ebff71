"""GPU benchmarks: the triton and cuda providers, each reported against the roofline.

`pytest benchmarks --benchmark-only` runs them when a CUDA device is present; without one
every case skips. Each benchmark records (extra_info) the analytic bytes and FLOPs of the
call (roofline.py), the achieved TFLOP/s and GB/s, the roofline floor for this GPU and
dtype, and the fraction of it reached (floor / measured time).
"""
import pytest
import torch

import roofline
from workloads import PROVIDERS, WORKLOADS, Unavailable, Workload, get_callable, make_inputs

from metaembed_kernels import DEFAULT_GROUPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The shared workloads, plus the paper's retrieval setting at a tenth of the index (4.3 GiB
# of bf16 candidates: fits any data-centre GPU) for one query and for a query batch past the
# compute-bound crossover (roofline.compute_bound_batch: 19 on H100, 10 on A100).
GPU_WORKLOADS = dict(WORKLOADS)
GPU_WORKLOADS.update({
    w.name: w for w in [
        Workload("P1", 1, 16, 10_000, 64, 3584, ((16, 64),), description="paper setting, 1 query, 10k index"),
        Workload("P32", 32, 16, 10_000, 64, 3584, ((16, 64),), description="paper setting, 32 queries"),
        Workload("L384", 384, 16, 384, 64, 3584, DEFAULT_GROUPS, kind="loss", hard_negatives=1,
                 description="paper training step: 384 gathered, 1 hard negative"),
        # budgets past one Triton tile (token chunks): ColBERT documents, ColPali pages
        Workload("CB300", 32, 32, 5000, 300, 128, ((32, 300),), description="ColBERT rerank, 300-token documents"),
        Workload("CP1030", 32, 32, 2000, 1030, 128, ((32, 1030),), description="ColPali pages, 1030 patches"),
        Workload("LCP", 64, 32, 64, 1030, 128, ((8, 64), (32, 1030)), kind="loss", hard_negatives=1,
                 description="ColPali-sized training step, 1 hard negative"),
    ]
})
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_PROVIDERS = ("triton", "cuda")
assert all(p in PROVIDERS for p in GPU_PROVIDERS)
CASES = [
    pytest.param(w, dt, p, id=f"{w}-{dt}-{p}")
    for w in GPU_WORKLOADS for dt in DTYPES for p in GPU_PROVIDERS
]


def cost(w: Workload, dtype: torch.dtype):
    if w.kind == "loss":
        return roofline.loss_step_cost(w.nq, w.nc, w.hard_negatives, w.d, w.groups, dtype)
    return roofline.maxsim_cost(w.nq, w.nc, w.d, w.groups, dtype)


@pytest.mark.parametrize("workload,dtype,provider", CASES)
def test_bench_gpu(benchmark, workload, dtype, provider):
    w = GPU_WORKLOADS[workload]
    torch_dtype = DTYPES[dtype]
    x = make_inputs(w, torch_dtype, device="cuda")
    try:
        fn = get_callable(provider, w, torch_dtype, x)
    except Unavailable as err:
        pytest.skip(str(err))

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"gpu-{workload}-{dtype}"
    nbytes, flops = cost(w, torch_dtype)
    benchmark.extra_info.update(workload=workload, dtype=dtype, provider=provider, flops=w.flops,
                                bytes=nbytes, roofline_flops=flops, device=torch.cuda.get_device_name())
    benchmark.pedantic(call, rounds=10, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=flops / median / 1e12, gbytes_per_s=nbytes / median / 1e9)
    gpu = roofline.gpu_for(torch.cuda.get_device_name())
    if gpu is not None:
        r = roofline.Roofline(nbytes, flops, gpu, torch_dtype)
        benchmark.extra_info.update(roofline_ms=r.seconds * 1e3, bound=r.bound,
                                    fraction_of_roofline=r.fraction(median))
