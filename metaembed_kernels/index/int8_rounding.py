"""Score-aware rounding for the int8 index: which integer codes a vector gets at its scale.

The scale of a vector v stays the per-vector symmetric max_d |v_d| / 127 (storage.py); only
the choice of codes x changes. Rounding each v_d / scale to the nearest integer minimises
|e|, e = scale·x - v, but a score sees the error through a query, <q, e>, and queries are not
isotropic: trained embeddings share a few dominant directions (on the index benchmark's real
MetaEmbed vectors, the top direction holds 44% of the query vectors' energy and the top ten
72%). With H the second moment of the vectors the error will be read against,
E[<q, e>^2] = e^T H e, so the codes are chosen to minimise e^T H e instead of |e|^2:
sequential rounding with error feedback (GPTQ, Frantar et al. 2022; the optimal-brain-surgeon
update), coordinate by coordinate:

    U = upper Cholesky factor of H^-1
    for d = 0 .. D-1:  x_d = clamp(round(w_d), -127, 127);  err = (w_d - x_d) / U[d, d]
                       w_{d+1..} -= err * U[d, d+1..]           (w = v / scale, in code units)

which pushes each coordinate's rounding error into the later coordinates along the directions
H weighs least. H is estimated from the vectors being added (unit-normalised, so that long
vectors do not dominate; masked ones excluded) and damped by a fraction of its mean diagonal;
a batch of fewer than D vectors is rounded to nearest. On the index
benchmark's vectors the rms of <q, e> drops from 3.8e-4 to 2.7e-4 and int8 recall@10 against
exact float32 at (16, 64) rises from 0.988 to 0.992 (the notes of issue 12), for 14% more |e|
(no coordinate's error beyond 2 steps there).

Codes depend on the batch they were added with (through H), never on anything else (not the
thread count: see MOMENT_ROWS): a search scores the stored, dequantised vectors exactly either
way.
"""
from __future__ import annotations

from typing import Optional

import torch

INT8_MAX = 127
# Damping: H + DAMP * mean(diag H) * I. Smaller shapes harder (more |e|). On the benchmark's
# vectors DAMP = 0.001 / 0.01 (GPTQ's default) / 0.1 gave recall@10 0.9906 / 0.9916 / 0.9924,
# rms <q, e> - / 2.80e-4 / 2.71e-4 and |e| +31% (0.01) / +14% (0.1).
DAMP = 0.1
# Coordinates updated one at a time before the rest are updated by one matrix product.
BLOCK = 16
# Vectors per product when summing the moment (in float64, in order): short enough that BLAS
# does not split the sum over vectors between threads, so that H, and the codes, are the same
# for any thread count (one float32 product over a whole 64 MB chunk of `add` changed 3,337 of
# 74 M codes between 1 and 2 threads).
MOMENT_ROWS = 1024


def second_moment(v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
    """(sum of u u^T over the valid non-zero vectors u = v / |v| of v (..., D), in float64; their
    count). mask (...) bool: True = valid."""
    u = v.reshape(-1, v.shape[-1]).to(torch.float32)
    if mask is not None:
        u = u[mask.reshape(-1)]
    norms = u.norm(dim=-1, keepdim=True)
    u = u[norms.squeeze(-1) > 0] / norms[norms.squeeze(-1) > 0]
    moment = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64, device=u.device)
    for r0 in range(0, u.shape[0], MOMENT_ROWS):
        part = u[r0: r0 + MOMENT_ROWS]
        moment += (part.T @ part).double()
    return moment, u.shape[0]


def rounding_factor(moment: torch.Tensor, count: int) -> Optional[torch.Tensor]:
    """U (D, D) float32, the upper Cholesky factor of (H + DAMP * mean(diag H) * I)^-1 for
    H = moment / count; None (plain rounding) with fewer than D vectors to estimate H from
    (H would not have full rank: the few directions it saw would take all the shaping)."""
    if count < moment.shape[0]:
        return None
    h = moment / count
    h = h + DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


def feedback_round(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Integer codes (float32, in [-127, 127]) for w (n, D) float32 in code units, chosen by
    error feedback through `factor` (rounding_factor). Each row is independent. Round half to
    even, as torch.round; an exactly integral row (within range) keeps its values."""
    n, D = w.shape
    wt = w.T.contiguous()  # (D, n): coordinate d of every row is one contiguous line
    codes = torch.empty_like(wt)
    for b0 in range(0, D, BLOCK):
        b1 = min(D, b0 + BLOCK)
        errors = torch.empty(b1 - b0, n, dtype=wt.dtype, device=wt.device)
        for d in range(b0, b1):
            torch.round(wt[d], out=codes[d]).clamp_(-INT8_MAX, INT8_MAX)
            torch.sub(wt[d], codes[d], out=errors[d - b0]).div_(factor[d, d])
            if d + 1 < b1:
                wt[d + 1:b1].addr_(factor[d, d + 1:b1], errors[d - b0], alpha=-1)
        if b1 < D:
            wt[b1:].addmm_(factor[b0:b1, b1:].T, errors, alpha=-1)
    return codes.T
