"""Shared test utilities: shape sweeps, exact-arithmetic inputs, dtype-scaled tolerances and
readable mismatch reports."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from metaembed_kernels import _extension, available_backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------
# Shape sweep of the foundation issue: Nq, Nc in {1, 3, 17}; Rq in {1, 5, 16};
# Rc in {1, 7, 64}; D in {1, 24, 129}. Every (Rq, Rc, D) combination appears, with Nq/Nc
# rotating so that each value of each axis is covered against the others.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    nq: int
    nc: int
    rq: int
    rc: int
    d: int
    masked: bool
    seed: int

    def __str__(self) -> str:
        m = "-mask" if self.masked else ""
        return f"nq{self.nq}-nc{self.nc}-rq{self.rq}-rc{self.rc}-d{self.d}{m}"


def sweep_cases():
    cases = []
    sizes = (1, 3, 17)
    for k, (rq, rc, d) in enumerate(itertools.product((1, 5, 16), (1, 7, 64), (1, 24, 129))):
        cases.append(Case(sizes[k % 3], sizes[(k // 3 + k) % 3], rq, rc, d, masked=bool(k % 2), seed=k))
    return cases


def random_groups(rq: int, rc: int, rng: random.Random, max_groups: int = 4) -> Tuple[Tuple[int, int], ...]:
    """A random group list in random order: always a 1-token prefix and the full budget."""
    groups = {(1, 1), (rq, rc)}
    for _ in range(rng.randint(0, max_groups - 2)):
        groups.add((rng.randint(1, rq), rng.randint(1, rc)))
    groups = list(groups)
    rng.shuffle(groups)
    return tuple(groups)


def random_masks(nq, rq, nc, rc, gen: torch.Generator):
    """Masks with ~35% invalid tokens, a fully masked row on each side, and a row whose
    only valid token is the last one (so short prefixes see no valid token)."""
    q_mask = torch.rand(nq, rq, generator=gen) > 0.35
    c_mask = torch.rand(nc, rc, generator=gen) > 0.35
    q_mask[nq // 2] = False
    c_mask[nc // 2] = False
    if nc > 1:
        c_mask[0] = False
        c_mask[0, -1] = True
    return q_mask, c_mask


def exact_values(shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Multiples of 1/4 in [-1, 1]: exact in bf16/fp16/fp32, and every dot product (D <= 129)
    and sum of them is exact in fp32, so argmax decisions, ties included, are identical in
    every backend and in the float64 reference."""
    return (torch.randint(-4, 5, shape, generator=gen).to(torch.float32) / 4).to(dtype)


def normal_values(shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


def score_tolerance(q: torch.Tensor, c: torch.Tensor, groups, factor: float = 4.0) -> torch.Tensor:
    """Elementwise bound on |fp32 kernel - fp64 reference| for maxsim scores.

    Standard summation bound: a length-D dot product in fp32 errs by at most
    ~D * u32 * sum_d |q_d c_d|; summing r_q maxima adds r_q * u32 relative. We bound
    sum_d |q_d c_d| by the MaxSim of |q| and |c| (per element), times a safety factor.
    """
    from metaembed_kernels import reference

    d = q.shape[-1]
    rq = max(g[0] for g in groups)
    magnitude = reference.maxsim_grouped(q.double().abs(), c.double().abs(), groups)
    return factor * (d + rq) * UNIT_ROUNDOFF[torch.float32] * magnitude + 1e-30


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol, name: str = "", rtol: float = 0.0):
    """Like torch.testing.assert_close, with an elementwise atol and a report naming the worst
    elements (index, actual, expected, error, allowed)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected) if not torch.is_tensor(atol) else atol
    allowed = atol.double().cpu().expand_as(expected) + rtol * expected.abs()
    err = (actual - expected).abs()
    bad = ~(err <= allowed)  # NaN counts as bad
    if bad.any():
        n_bad = int(bad.sum())
        worst = torch.argsort(torch.where(bad, err - allowed, torch.full_like(err, -1.0)).flatten(), descending=True)
        lines = [f"{name}: {n_bad} of {expected.numel()} elements out of tolerance (shape {tuple(expected.shape)})"]
        for flat in worst[: min(8, n_bad)].tolist():
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape))
            lines.append(
                f"  at {idx}: actual {actual[idx].item():.9g}, expected {expected[idx].item():.9g}, "
                f"error {err[idx].item():.3g} > allowed {allowed[idx].item():.3g}"
            )
        raise AssertionError("\n".join(lines))


def grad_tolerance(expected: torch.Tensor, dtype: torch.dtype, n_terms: int, magnitude: torch.Tensor):
    """Bound for a gradient accumulated in fp32 from n_terms products and rounded to dtype."""
    return 2 * UNIT_ROUNDOFF[dtype] * expected.abs() + 4 * n_terms * UNIT_ROUNDOFF[torch.float32] * magnitude + 1e-12


def maybe(x: Optional[torch.Tensor], fn):
    return None if x is None else fn(x)


def cpu_kernel_backends():
    """Backends that run compiled or Triton (interpreter) kernels on CPU tensors here."""
    return [b for b in available_backends("cpu") if b != "reference"]


OP_PREFIX = {"cpu": "", "cuda": "", "reference": "reference_", "triton": "triton_"}


def op_backends():
    """Every backend whose ops run CPU tensors here (reference, cpu, triton when interpreted)."""
    return list(available_backends("cpu"))


def ops_of(backend: str):
    """name -> the default overload of that backend's op, e.g. ops_of("triton")("maxsim_grouped")."""
    from metaembed_kernels.backends import get_backend

    b = get_backend(backend)
    return lambda name: getattr(getattr(torch.ops, b.op_namespace), b.op_prefix + name).default


requires_extension = pytest.mark.skipif(not _extension.is_loaded(), reason="C++ extension not built")
requires_gpu = pytest.mark.gpu  # skipped without a CUDA device (conftest.py); `pytest -m gpu` selects them
