"""Readable pure-torch reference implementations: the test oracle and the benchmark baseline.

They materialise the full similarity tensor sim[a, b, i, j] = <q[a, i], c[b, j]>, so they
need O(Nq * Nc * Rq * Rc) memory. Inputs of any float dtype are computed in float32, or in
float64 when given float64 (the oracle mode used by the tests).

    s_g(a, b) = sum_{i < r_q(g), q_mask[a, i]}  max_{j < r_c(g), c_mask[b, j]}  sim[a, b, i, j]

A query token with no valid candidate token in the prefix contributes 0. The gradient of
each max goes to the lowest maximising index j (``argmax`` + ``gather``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Groups = Sequence[Tuple[int, int]]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grouped_scores_from_sim(
    sim: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor],
    c_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Reduce a similarity tensor sim[..., i, j] to per-group scores [G, ...].

    ``q_mask`` must broadcast against sim[..., :, 0] and ``c_mask`` against sim[..., 0, :].
    """
    if c_mask is not None:
        sim = sim.masked_fill(~c_mask.unsqueeze(-2), float("-inf"))
    scores = []
    for r_q, r_c in groups:
        tile = sim[..., :r_q, :r_c]
        best = tile.gather(-1, tile.argmax(-1, keepdim=True)).squeeze(-1)  # lowest index on ties
        if c_mask is not None:  # no valid candidate token in the prefix -> contributes 0
            has_valid = c_mask[..., :r_c].any(-1, keepdim=True)
            best = torch.where(has_valid, best, torch.zeros_like(best))
        if q_mask is not None:
            best = torch.where(q_mask[..., :r_q], best, torch.zeros_like(best))
        scores.append(best.sum(-1))
    return torch.stack(scores)


def maxsim_grouped(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q (Nq, Rq, D), c (Nc, Rc, D) -> scores (G, Nq, Nc)."""
    dtype = _compute_dtype(q)
    rq = max(g[0] for g in groups)
    rc = max(g[1] for g in groups)
    sim = torch.einsum("aid,bjd->abij", q[:, :rq].to(dtype), c[:, :rc].to(dtype))
    qm = None if q_mask is None else q_mask[:, None, :rq]  # (Nq, 1, rq)
    cm = None if c_mask is None else c_mask[None, :, :rc]  # (1, Nc, rc)
    return grouped_scores_from_sim(sim, groups, qm, cm)


def maxsim_grouped_paired(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each query against its own candidates: q (Nq, Rq, D), c (Nq, K, Rc, D) -> (G, Nq, K)."""
    dtype = _compute_dtype(q)
    rq = max(g[0] for g in groups)
    rc = max(g[1] for g in groups)
    sim = torch.einsum("aid,akjd->akij", q[:, :rq].to(dtype), c[:, :, :rc].to(dtype))
    qm = None if q_mask is None else q_mask[:, None, :rq]  # (Nq, 1, rq)
    cm = None if c_mask is None else c_mask[:, :, :rc]  # (Nq, K, rc)
    return grouped_scores_from_sim(sim, groups, qm, cm)


def infonce_logits(
    q, c, groups, temperature, hard_negatives=None, hard_negatives_mask=None, q_mask=None, c_mask=None
) -> torch.Tensor:
    """logits[g, a] = concat(s_g(a, c[:]), s_g(a, hard_negatives[a, :])) / temperature."""
    logits = maxsim_grouped(q, c, groups, q_mask, c_mask)
    if hard_negatives is not None and hard_negatives.shape[1] > 0:
        hn = maxsim_grouped_paired(q, hard_negatives, groups, q_mask, hard_negatives_mask)
        logits = torch.cat([logits, hn], dim=-1)
    return logits / temperature


def matryoshka_infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    *,
    weights=None,
    temperature: float = 0.03,
    hard_negatives: Optional[torch.Tensor] = None,
    hard_negatives_mask: Optional[torch.Tensor] = None,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_group_losses: bool = False,
):
    """loss = sum_g w_g * cross_entropy(logits_g, labels, reduction) / G."""
    logits = infonce_logits(q, c, groups, temperature, hard_negatives, hard_negatives_mask, q_mask, c_mask)
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device)
    group_losses = torch.stack([F.cross_entropy(lg, labels, reduction=reduction) for lg in logits])
    w = torch.ones_like(group_losses) if weights is None else torch.as_tensor(
        weights, dtype=group_losses.dtype, device=group_losses.device
    )
    loss = (w * group_losses).sum() / len(groups)
    return (loss, group_losses) if return_group_losses else loss
