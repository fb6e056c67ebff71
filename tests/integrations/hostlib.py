"""Shared helpers of the host-library tests (tests/integrations/test_<host>.py).

A host test module runs only inside its own environment, where scripts/test_integrations.sh
sets ``METAEMBED_HOST=<host>``; elsewhere (``make test``) it is skipped as a whole. With the
variable set, a missing host or a host at another version is an error, not a skip.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_host(host: str, versions: Dict[str, str]) -> None:
    """Skip the calling module unless METAEMBED_HOST == host; then insist on the pinned versions."""
    if os.environ.get("METAEMBED_HOST") != host:
        pytest.skip(f"{host} tests run in their own environment: make test-integrations "
                    f"(scripts/test_integrations.sh {host})", allow_module_level=True)
    for dist, pinned in versions.items():
        try:
            got = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"METAEMBED_HOST={host} but {dist} is not installed") from None
        if got != pinned:
            raise RuntimeError(f"METAEMBED_HOST={host} needs {dist}=={pinned}, found {got}")


def unit(*shape, dtype=torch.float32, sign: int = 0, generator=None) -> torch.Tensor:
    """L2-normalised random token embeddings. sign=+1 / -1: every component >= 0 / <= 0, so that
    the similarities between a +1 and a -1 tensor are all negative."""
    x = torch.randn(*shape, generator=generator)
    if sign:
        x = sign * x.abs()
    return F.normalize(x, dim=-1).to(dtype)


def skiplist_mask(*shape, p_keep: float = 0.7, generator=None) -> torch.Tensor:
    """Non-prefix bool mask (skiplist style): random tokens dropped, first token kept."""
    m = torch.rand(*shape, generator=generator) < p_keep
    m[..., 0] = True
    return m


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """|got - want| <= rtol * max(|want|) elementwise (a relative bound on the tensor's scale)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp(min=1e-30)
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3e} > {rtol:g} * {scale:.3e}"


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def assert_same_update(before0, after0, before1, after1, rtol: float = 1e-4) -> None:
    """Two training runs from the same weights made the same update: every parameter's change
    agrees to rtol of the largest change of any parameter (a tensor whose own gradient is
    rounding noise, e.g. an attention key bias, is held to the global scale, not its own)."""
    deltas0 = {k: after0[k].double() - before0[k].double() for k in after0}
    scale = max(float(d.abs().max()) for d in deltas0.values() if d.numel())
    assert scale > 0, "the optimizer step changed no weight"
    moved = 0
    for k, d0 in deltas0.items():
        assert torch.equal(before1[k], before0[k]), f"{k}: runs started from different weights"
        d1 = after1[k].double() - before1[k].double()
        err = float((d1 - d0).abs().max()) if d0.numel() else 0.0
        assert err <= rtol * scale, f"update of {k}: max |diff| {err:.3e} > {rtol:g} * {scale:.3e}"
        moved += bool(d0.numel() and d0.abs().max() > 1e-3 * scale)
    assert moved >= 10, f"only {moved} tensors moved: not a real training step"
