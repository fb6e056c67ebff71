"""Readable pure-torch reference implementations: the test oracle and the benchmark baseline.

They materialise the full similarity tensor sim[a, b, i, j] = <q[a, i], c[b, j]>, so they
need O(Nq * Nc * Rq * Rc) memory. Inputs of any float dtype are computed in float32, or in
float64 when given float64 (the oracle mode used by the tests).

    s_g(a, b) = sum_{i < r_q(g), q_mask[a, i]}  max_{j < r_c(g), c_mask[b, j]}  sim[a, b, i, j]

Semantics every backend follows:

* A query token with no valid candidate token in the prefix contributes 0; validity comes
  from the masks only, so a -inf similarity is a value like any other.
* The gradient of each max goes to the lowest maximising valid index j.
* NaN in a valid token propagates as in torch: a NaN similarity is the max (torch.amax), the
  argmax is the lowest NaN index (torch.argmax), scores, losses and gradients that read it
  are NaN.
* Masked tokens are never read: they are zeroed before any arithmetic, so NaN or inf there
  changes nothing, and their gradients are exactly 0.

The functions here are differentiable by autograd (the oracle); ``*_backward`` give the same
gradients in closed form, W = sum_g dS_g * onehot(argmax_g), for the reference backend's ops.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Groups = Sequence[Tuple[int, int]]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _zero_masked(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., R, D) with the tokens whose mask (..., R) is False set to 0 (never read)."""
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0)


def _prefix_argmax(tile: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Lowest valid j attaining max_{valid j} tile[..., j] (NaN counts as the maximum, as in
    torch.argmax); 0 when no j is valid (that row's max is never used)."""
    if valid is None:
        return tile.argmax(-1, keepdim=True)
    best = tile.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)  # NaN propagates
    is_best = valid & ((tile == best) | (tile.isnan() & best.isnan()))
    return is_best.to(torch.uint8).argmax(-1, keepdim=True)  # first True


def grouped_scores_from_sim(
    sim: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor],
    c_mask: Optional[torch.Tensor],
    *,
    return_argmax: bool = False,
):
    """Reduce a similarity tensor sim[..., i, j] to per-group scores [G, ...].

    ``q_mask`` must broadcast against sim[..., :, 0] and ``c_mask`` against sim[..., 0, :].
    With ``return_argmax``, also the per-group argmax (..., r_q, 1) and the (..., r_q)
    mask of rows whose maximum counts.
    """
    scores, argmaxes = [], []
    for r_q, r_c in groups:
        tile = sim[..., :r_q, :r_c]
        valid = None if c_mask is None else c_mask[..., :r_c].unsqueeze(-2).expand(tile.shape)
        idx = _prefix_argmax(tile, valid)
        best = tile.gather(-1, idx).squeeze(-1)
        takes = torch.ones_like(best, dtype=torch.bool)
        if c_mask is not None:  # no valid candidate token in the prefix -> contributes 0
            takes = takes & c_mask[..., :r_c].any(-1, keepdim=True)
        if q_mask is not None:
            takes = takes & q_mask[..., :r_q]
        scores.append(torch.where(takes, best, torch.zeros_like(best)).sum(-1))
        argmaxes.append((idx, takes))
    out = torch.stack(scores)
    return (out, argmaxes) if return_argmax else out


def _sim(q, c, rq: int, rc: int, q_mask, c_mask, paired: bool) -> torch.Tensor:
    dtype = _compute_dtype(q)
    q = _zero_masked(q[:, :rq], None if q_mask is None else q_mask[:, :rq]).to(dtype)
    c = _zero_masked(c[..., :rc, :], None if c_mask is None else c_mask[..., :rc]).to(dtype)
    return torch.einsum("aid,akjd->akij" if paired else "aid,bjd->abij", q, c)


def _masks(q_mask, c_mask, rq: int, rc: int, paired: bool):
    qm = None if q_mask is None else q_mask[:, None, :rq]  # (Nq, 1, rq)
    if c_mask is None:
        cm = None
    elif paired:
        cm = c_mask[:, :, :rc]  # (B, N, rc)
    else:
        cm = c_mask[None, :, :rc]  # (1, Nc, rc)
    return qm, cm


def _budget(groups: Groups) -> Tuple[int, int]:
    return max(g[0] for g in groups), max(g[1] for g in groups)


def maxsim_grouped(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q (Nq, Rq, D), c (Nc, Rc, D) -> scores (G, Nq, Nc)."""
    rq, rc = _budget(groups)
    sim = _sim(q, c, rq, rc, q_mask, c_mask, paired=False)
    return grouped_scores_from_sim(sim, groups, *_masks(q_mask, c_mask, rq, rc, paired=False))


def maxsim_grouped_paired(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each query against its own candidates: q (B, Rq, D), c (B, N, Rc, D) -> (G, B, N)."""
    rq, rc = _budget(groups)
    sim = _sim(q, c, rq, rc, q_mask, c_mask, paired=True)
    return grouped_scores_from_sim(sim, groups, *_masks(q_mask, c_mask, rq, rc, paired=True))


def scores_backward(
    dS: torch.Tensor,
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Groups,
    q_mask: Optional[torch.Tensor],
    c_mask: Optional[torch.Tensor],
    paired: bool,
    output_mask: Sequence[bool] = (True, True),
):
    """Closed-form gradients of the scores: with dS (G, Nq, Nc) (or (G, B, N) paired),
    W[a, b, i, j] = sum_g dS_g(a, b) [row (a, i) counts in g] [j = argmax_g(a, b, i)], and
    dq = W . c, dc = W^T . q (masked tokens get exactly 0). Returns (dq, dc) in the
    compute dtype; None for a gradient whose output_mask flag is False."""
    rq, rc = _budget(groups)
    sim = _sim(q, c, rq, rc, q_mask, c_mask, paired)
    _, argmaxes = grouped_scores_from_sim(sim, groups, *_masks(q_mask, c_mask, rq, rc, paired), return_argmax=True)
    W = torch.zeros_like(sim)
    for g, ((r_q, r_c), (idx, takes)) in enumerate(zip(groups, argmaxes)):
        w_rows = torch.where(takes, dS[g].to(sim.dtype).unsqueeze(-1), torch.zeros((), dtype=sim.dtype))
        W[..., :r_q, :r_c] += torch.zeros_like(sim[..., :r_q, :r_c]).scatter(-1, idx, w_rows.unsqueeze(-1))
    dtype = _compute_dtype(q)
    qz = _zero_masked(q[:, :rq], None if q_mask is None else q_mask[:, :rq]).to(dtype)
    cz = _zero_masked(c[..., :rc, :], None if c_mask is None else c_mask[..., :rc]).to(dtype)
    dq = dc = None
    if output_mask[0]:
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dq[:, :rq] = torch.einsum("akij,akjd->aid" if paired else "abij,bjd->aid", W, cz)
        if q_mask is not None:
            dq = dq.masked_fill(~q_mask.unsqueeze(-1), 0)
    if output_mask[1]:
        dc = torch.zeros(c.shape, dtype=dtype, device=c.device)
        dc[..., :rc, :] = torch.einsum("akij,aid->akjd" if paired else "abij,aid->bjd", W, qz)
        if c_mask is not None:
            dc = dc.masked_fill(~c_mask.unsqueeze(-1), 0)
    return dq, dc


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


def infonce_terms(q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask):
    """Per-query cross-entropy terms and log-sum-exps, both (G, Nq):
    terms[g, a] = lse[g, a] - logits_g[a, labels[a]], logits = scale * scores."""
    logits = infonce_logits(q, c, groups, 1.0 / scale, hard_negatives, hn_mask, q_mask, c_mask)
    lse = torch.logsumexp(logits, dim=-1)
    positive = logits.gather(-1, labels.view(1, -1, 1).expand(len(groups), -1, 1)).squeeze(-1)
    return lse - positive, lse


def infonce_backward(grad, lse, q, c, hard_negatives, labels, groups, scale, q_mask, c_mask, hn_mask,
                     output_mask=(True, True, True)):
    """Closed-form gradients of the terms: dS_g(a, b) = grad[g, a] * scale * (softmax - onehot)
    over in-batch candidates, grad[g, a] * scale * softmax over a's hard negatives."""
    dtype = _compute_dtype(q)
    grad = grad.to(dtype)
    lse = lse.to(dtype)
    s_in = maxsim_grouped(q, c, groups, q_mask, c_mask)  # (G, Nq, Nc)
    onehot = F.one_hot(labels, c.shape[0]).to(dtype) if c.shape[0] > 0 else s_in.new_zeros(s_in.shape[1:])
    ds_in = grad.unsqueeze(-1) * scale * (torch.exp(scale * s_in - lse.unsqueeze(-1)) - onehot)
    dq, dc = scores_backward(ds_in, q, c, groups, q_mask, c_mask, paired=False,
                             output_mask=(output_mask[0], output_mask[1]))
    dhn = None
    if hard_negatives.shape[1] > 0 and (output_mask[0] or output_mask[2]):
        s_hn = maxsim_grouped_paired(q, hard_negatives, groups, q_mask, hn_mask)  # (G, Nq, K)
        ds_hn = grad.unsqueeze(-1) * scale * torch.exp(scale * s_hn - lse.unsqueeze(-1))
        dq_hn, dhn = scores_backward(ds_hn, q, hard_negatives, groups, q_mask, hn_mask, paired=True,
                                     output_mask=(output_mask[0], output_mask[2]))
        if output_mask[0]:
            dq = dq + dq_hn
    if output_mask[2] and dhn is None:
        dhn = torch.zeros(hard_negatives.shape, dtype=dtype, device=q.device)
    return dq, dc, dhn
