"""Per-query ("paired" / KD) scoring: maxsim_paired against the einsum reference and each host
library's own KD function, on the CPU (issue 11: >= 3x the fastest host function).

Shapes: P1 (issue 11's), B = 32 queries x 32 tokens, each against its own N = 32 documents of
180 tokens, D = 128 (a distillation batch as the hosts' ColBERT models make it); P2, the same
batch at MetaEmbed's budget, 16 query vectors and 64 candidate vectors. Hosts are imported from the benchmark venv (PyLate and
colpali-engine are installed by `make bench-deps`, sentence-transformers comes with the
test dependencies); a host that cannot be imported is skipped with the reason.
"""
import importlib

import pytest
import torch

from metaembed_kernels import maxsim_paired, reference

SHAPES = {"P1": (32, 32, 32, 180, 128), "P2": (32, 32, 16, 64, 128)}  # B, N, Rq, Rc, D
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(shape, dtype):
    B, N, RQ, RC, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, RQ, D, generator=g), dim=-1).to(dtype)
    c = torch.nn.functional.normalize(torch.randn(B, N, RC, D, generator=g), dim=-1).to(dtype)
    return q, c


def _host(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:  # noqa: BLE001 - any import failure means "not installed here"
        pytest.skip(f"{module}.{name} unavailable: {type(err).__name__}: {err}")


def _provider(name: str, q, c):
    if name == "cpu":
        return lambda: maxsim_paired(q, c, backend="cpu")
    if name == "reference":  # the einsum over the (B, N, Rq, Rc) similarity tensor
        return lambda: reference.maxsim_grouped_paired(q, c, ((q.shape[1], c.shape[2]),))
    if name == "pylate":
        fn = _host("pylate.scores", "colbert_kd_scores")
        return lambda: fn(q, c)
    if name == "colpali-engine":
        fn = _host("colpali_engine.utils.maxsim", "maxsim_kd")
        return lambda: fn(q, c)
    if name == "sentence-transformers":
        fn = _host("sentence_transformers.multi_vector_encoder.scoring", "colbert_kd_scores")
        return lambda: fn(q, c)
    raise ValueError(name)


PROVIDERS = ["cpu", "reference", "pylate", "colpali-engine", "sentence-transformers"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("workload", list(SHAPES))
def test_bench_paired(benchmark, workload, dtype, provider):
    shape = SHAPES[workload]
    B, N, RQ, RC, D = shape
    flops = 2.0 * B * N * RQ * RC * D
    q, c = _inputs(shape, DTYPES[dtype])
    fn = _provider(provider, q, c)
    out = fn()
    expected = maxsim_paired(q, c, backend="cpu")
    torch.testing.assert_close(out.float().reshape(expected.shape), expected, rtol=2e-2, atol=2e-2 * RQ)
    benchmark.group = f"{workload}-{dtype}"
    benchmark.extra_info.update(workload=workload, dtype=dtype, provider=provider, flops=flops)
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)  # a noisy 2-core host: 15 rounds
    benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9
