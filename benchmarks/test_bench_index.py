"""Index benchmarks (pytest-benchmark): `pytest benchmarks/test_bench_index.py --benchmark-only`.

Each case times a provider and, in the same session, its baseline (index_workloads.py); the
ratios and targets are in extra_info, and benchmarks/index_report.py writes them as one table.
The synthetic 200k-candidate indexes are built once (a few minutes) and cached on disk.
"""
import pytest
import torch

from index_workloads import (DEFAULT_GROUPS, K, N_SMALL, bandwidth_gbs, matmul_same_flops, queries, slab_bytes,
                             synthetic_candidates, synthetic_index)
from metaembed_kernels import maxsim_grouped

ROUNDS = dict(rounds=5, warmup_rounds=1, iterations=1)


@pytest.fixture(scope="session")
def indexes():
    return {dt: synthetic_index(dt) for dt in ("bfloat16", "int8")}


@pytest.fixture(scope="session")
def small():
    return {dt: synthetic_index(dt, N_SMALL) for dt in ("float32", "bfloat16")}


@pytest.fixture(scope="session")
def bandwidth():
    return bandwidth_gbs()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_memory_floor(benchmark, indexes, bandwidth, dtype):
    q = queries(1)
    benchmark.group = "index floor (1, 1) Nq=1"
    benchmark.pedantic(lambda: indexes[dtype].search(q, K, budget=(1, 1)), **ROUNDS)
    gbs = slab_bytes(indexes[dtype], 1) / benchmark.stats.stats.min / 1e9
    benchmark.extra_info.update(gbs=gbs, bandwidth_gbs=bandwidth, fraction=gbs / bandwidth, target=">= 0.70")


@pytest.mark.parametrize("budget", [(1, 1), (2, 4), (4, 8)])
@pytest.mark.parametrize("nq", [1, 16])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_int8_vs_bf16(benchmark, indexes, budget, nq, dtype):
    q = queries(nq)
    benchmark.group = f"index int8 vs bf16 {budget} Nq={nq}"
    benchmark.pedantic(lambda: indexes[dtype].search(q, K, budget=budget), **ROUNDS)


@pytest.mark.parametrize("mode", ["grouped", "five searches"])
def test_one_pass_many_budgets(benchmark, small, mode):
    q = queries(16)
    index = small["bfloat16"]
    benchmark.group = "index search_grouped vs 5 searches"
    if mode == "grouped":
        fn = lambda: index.search_grouped(q, K, DEFAULT_GROUPS)  # noqa: E731
    else:
        fn = lambda: [index.search(q, K, budget=g) for g in DEFAULT_GROUPS]  # noqa: E731
    benchmark.pedantic(fn, rounds=2, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("provider", ["search", "maxsim_grouped"])
def test_fusion(benchmark, small, provider):
    q = queries(16).to(torch.bfloat16)
    benchmark.group = "index fusion (16, 64) Nq=16 N=20k bf16"
    if provider == "search":
        fn = lambda: small["bfloat16"].search(q, K)  # noqa: E731
    else:
        c = synthetic_candidates(N_SMALL, torch.bfloat16)
        fn = lambda: maxsim_grouped(q, c)  # noqa: E731
    benchmark.pedantic(fn, rounds=2, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("budget", [(1, 1), (2, 4)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("provider", ["matmul", "maxsim_grouped", "search"])
def test_batched_small_budgets(benchmark, small, budget, dtype, provider):
    tdt = getattr(torch, dtype)
    nq, (rq, rc) = 256, budget
    benchmark.group = f"index batched {budget} {dtype} Nq=256 N=20k"
    if provider == "matmul":
        fn = matmul_same_flops(nq, rq, N_SMALL, rc, tdt)
    elif provider == "maxsim_grouped":
        c = synthetic_candidates(N_SMALL, tdt)[:, :rc].contiguous()
        q = queries(nq).to(tdt)[:, :rq].contiguous()
        fn = lambda: maxsim_grouped(q, c)  # noqa: E731
    else:
        q = queries(nq).to(tdt)
        fn = lambda: small[dtype].search(q, K, budget=budget)  # noqa: E731
    benchmark.pedantic(fn, **ROUNDS)
    benchmark.extra_info["gflops"] = 2 * nq * rq * N_SMALL * rc * 128 / benchmark.stats.stats.min / 1e9
