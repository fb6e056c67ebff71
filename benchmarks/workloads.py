"""Benchmark workloads and providers, shared by the pytest-benchmark suite and report.py.

A provider turns (workload, dtype, inputs) into a zero-argument callable that does the
whole computation once; it raises ``Unavailable`` when it cannot run here (missing peer,
no GPU, ...). FLOPs are those of the top-budget tile, 2 * Nq * Nc * Rq * Rc * D, counted
once however many groups a workload has.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped, reference


class Unavailable(Exception):
    """The provider cannot run this workload on this machine (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    nq: int
    rq: int
    nc: int
    rc: int
    d: int
    groups: Tuple[Tuple[int, int], ...]
    kind: str = "maxsim"  # "maxsim" or "loss" (forward + backward)
    hard_negatives: int = 0
    description: str = ""

    @property
    def flops(self) -> float:
        rq = max(g[0] for g in self.groups)
        rc = max(g[1] for g in self.groups)
        # in-batch tile plus each query's own hard negatives (forward only)
        return 2.0 * self.nq * (self.nc + self.hard_negatives) * rq * rc * self.d

    def input_bytes(self, dtype: torch.dtype) -> int:
        item = torch.tensor([], dtype=dtype).element_size()
        return item * self.d * (self.nq * self.rq + self.nc * self.rc + self.nq * self.hard_negatives * self.rc)


FULL = lambda rq, rc: ((rq, rc),)  # noqa: E731

WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("W0", 16, 16, 2000, 64, 128, DEFAULT_GROUPS, description="MetaEmbed-shaped smoke workload"),
        Workload("W1", 1, 32, 10000, 128, 128, FULL(32, 128), description="ColBERT single query"),
        Workload("W2", 32, 32, 2000, 128, 128, FULL(32, 128), description="rerank"),
        Workload("W3", 16, 16, 20000, 64, 128, DEFAULT_GROUPS, description="MetaEmbed budgets"),
        Workload("W4", 4, 16, 2000, 64, 3584, DEFAULT_GROUPS, description="MetaEmbed-7B width"),
        # test time at the smallest budget: an index stored at (1, 1) is one vector per
        # candidate, so scoring is a memory-bound GEMV (the cpu backend's few-token path)
        Workload("W5", 1, 1, 20000, 1, 3584, FULL(1, 1), description="test-time budget (1, 1), 7B width"),
        Workload("L1", 128, 16, 128, 64, 128, DEFAULT_GROUPS, kind="loss", hard_negatives=1,
                 description="training loss fwd+bwd"),
    ]
}


def make_inputs(w: Workload, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):  # L2-normalised token embeddings, as MetaEmbed produces
        x = torch.randn(*shape, generator=gen)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype=dtype, device=device)

    inputs = {"q": unit(w.nq, w.rq, w.d), "c": unit(w.nc, w.rc, w.d)}
    if w.hard_negatives:
        inputs["hn"] = unit(w.nq, w.hard_negatives, w.rc, w.d)
    return inputs


# ---- providers ---------------------------------------------------------------------------

def _maxsim_backend(backend: str):
    def factory(w: Workload, dtype, x):
        from metaembed_kernels import BackendUnavailableError, select_backend

        try:
            select_backend(backend, x["q"].device, dtype)
        except BackendUnavailableError as err:
            raise Unavailable(str(err)) from None
        if w.kind == "loss":
            return _loss_step(lambda q, c, hn: matryoshka_infonce(q, c, w.groups, hard_negatives=hn, backend=backend), x)
        return lambda: maxsim_grouped(x["q"], x["c"], w.groups, backend=backend)

    return factory


def _loss_step(loss_fn, x):
    q, c, hn = (t.detach().clone().requires_grad_() for t in (x["q"], x["c"], x["hn"]))

    def step():
        q.grad = c.grad = hn.grad = None
        loss = loss_fn(q, c, hn)
        loss.backward()
        return loss

    return step


def reference_provider(w: Workload, dtype, x):
    if w.kind == "loss":
        return _loss_step(lambda q, c, hn: reference.matryoshka_infonce(q, c, w.groups, hard_negatives=hn), x)
    return lambda: reference.maxsim_grouped(x["q"], x["c"], w.groups)


def einsum_top_budget_provider(w: Workload, dtype, x):
    """One einsum at the top budget, then running maxima at the r_c boundaries and prefix sums over i."""
    if w.kind == "loss":
        raise Unavailable("maxsim-only baseline")
    rq = max(g[0] for g in w.groups)
    rc = max(g[1] for g in w.groups)

    bounds = sorted({g[1] for g in w.groups})

    def run():
        sim = torch.einsum("aid,bjd->abij", x["q"][:, :rq].float(), x["c"][:, :rc].float())
        prefix_sums, running, start = {}, None, 0
        for bound in bounds:  # running max at each distinct r_c, then prefix sums over i
            part = sim[..., start:bound].amax(dim=-1)
            running = part if running is None else torch.maximum(running, part)
            prefix_sums[bound] = running.cumsum(dim=-1)
            start = bound
        return torch.stack([prefix_sums[r_c][..., r_q - 1] for r_q, r_c in w.groups])

    return run


def matmul_provider(w: Workload, dtype, x):
    """torch.matmul with the same FLOPs as the top-budget tile: the BLAS ceiling (fp32)."""
    if w.kind == "loss":
        raise Unavailable("maxsim-only baseline")
    rq = max(g[0] for g in w.groups)
    rc = max(g[1] for g in w.groups)
    a = x["q"][:, :rq].reshape(-1, w.d).float()
    b = x["c"][:, :rc].reshape(-1, w.d).float().t()  # transposed view: no copy per call
    out = torch.empty(a.shape[0], b.shape[1])
    return lambda: torch.matmul(a, b, out=out)


PROVIDERS: Dict[str, Callable] = {
    "cpu": _maxsim_backend("cpu"),
    "triton": _maxsim_backend("triton"),
    "cuda": _maxsim_backend("cuda"),
    "reference": reference_provider,
    "einsum-top-budget": einsum_top_budget_provider,
    "matmul": matmul_provider,
}

try:  # peers (PyLate, colpali-engine, maxsim-cpu, maxsim-fast, fast-maxsim), when installed
    from peers import PEER_PROVIDERS

    PROVIDERS.update(PEER_PROVIDERS)
except ImportError:  # pragma: no cover
    pass


def get_callable(provider: str, w: Workload, dtype: torch.dtype, x: dict) -> Callable:
    return PROVIDERS[provider](w, dtype, x)


def gflops(w: Workload, seconds: Optional[float]) -> Optional[float]:
    return None if not seconds else w.flops / seconds / 1e9


_MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {bench_dir!r})
from workloads import WORKLOADS, make_inputs, get_callable
torch.set_num_threads({threads})
w = WORKLOADS[{workload!r}]
fn = get_callable({provider!r}, w, getattr(torch, {dtype!r}), make_inputs(w, getattr(torch, {dtype!r})))
fn()  # first call: lazy initialisation is not the provider's working memory
def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS (VmHWM) to the current RSS
before = kb('VmRSS')
fn()
print((kb('VmHWM') - before) / 1024.0)
"""


def peak_extra_memory_mb(provider: str, w: Workload, dtype: str, threads: int) -> float:
    """Peak resident memory a second call adds over the RSS just before it (fresh process),
    in MiB: the provider's working memory, inputs excluded."""
    import os
    import subprocess
    import sys

    code = _MEMORY_PROBE.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads,
                                workload=w.name, provider=provider, dtype=dtype)
    # A fixed mmap threshold makes glibc map every block >= 64 KiB on its own and unmap it
    # on free, so freed memory leaves the RSS and the peak is the live working set.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])
