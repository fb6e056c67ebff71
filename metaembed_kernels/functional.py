"""Public functional API: argument checking, backend dispatch, loss assembly.

Scores, for each Matryoshka group g = (r_q, r_c):

    s_g(a, b) = sum_{i < r_q, q_mask[a, i]}  max_{j < r_c, c_mask[b, j]}  <q[a, i], c[b, j]>

Loss, with logits_g[a] = concat(s_g(a, c[:]), s_g(a, hard_negatives[a, :])) / temperature:

    loss = sum_g w_g * cross_entropy(logits_g, labels, reduction) / G

Backends return per-query cross-entropy terms (G, Nq); the reduction and the weighting
happen here, on G * Nq numbers.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _validation as V
from .backends import select_backend

DEFAULT_GROUPS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))


def maxsim_grouped(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Optional[Sequence[Tuple[int, int]]] = None,
    *,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Late-interaction scores of every query against every candidate, for all groups at once.

    Args:
        q: (Nq, Rq, D) query token embeddings, float32 / float16 / bfloat16.
        c: (Nc, Rc, D) candidate token embeddings, same dtype and device as ``q``.
        groups: (r_q, r_c) prefix budgets, 1 <= r_q <= Rq, 1 <= r_c <= Rc, in any order.
            ``None`` means the single full budget ((Rq, Rc),).
        q_mask: optional (Nq, Rq) bool, True marks a valid query token.
        c_mask: optional (Nc, Rc) bool, True marks a valid candidate token.
        backend: None/"auto", "reference", "cpu", "triton" or "cuda"
            (``METAEMBED_BACKEND`` is honoured when None).

    Returns:
        float32 tensor (G, Nq, Nc), in the order of ``groups``. Differentiable w.r.t.
        ``q`` and ``c``; the gradient of a max goes to the lowest maximising index.
    """
    V.check_embeddings(q, c)
    groups = V.normalize_groups(groups, q.shape[1], c.shape[1])
    q_mask = V.check_mask("q_mask", q_mask, q.shape[:2], "(Nq, Rq)", q.device)
    c_mask = V.check_mask("c_mask", c_mask, c.shape[:2], "(Nc, Rc)", q.device)
    impl = select_backend(backend, q.device, q.dtype, groups)
    return impl.maxsim_grouped(q, c, groups, q_mask, c_mask)


def maxsim(
    q: torch.Tensor,
    c: torch.Tensor,
    *,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Full-budget MaxSim (ColBERT) scores (Nq, Nc): ``maxsim_grouped(q, c)[0]``."""
    return maxsim_grouped(q, c, None, q_mask=q_mask, c_mask=c_mask, backend=backend)[0]


def matryoshka_infonce(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Optional[Sequence[Tuple[int, int]]] = None,
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
    backend: Optional[str] = None,
):
    """Matryoshka multi-vector InfoNCE, fused: memory O(Nq * G) besides inputs and grads.

    Args:
        q: (Nq, Rq, D) queries; c: (Nc, Rc, D) candidates shared by all queries.
        groups: (r_q, r_c) budgets; ``None`` means ((Rq, Rc),). MetaEmbed training uses
            ``DEFAULT_GROUPS``.
        weights: optional per-group weights (G,), default 1.
        temperature: logits are scores / temperature (default 0.03).
        hard_negatives: optional (Nq, K, Rc, D); row a holds query a's own K negatives,
            scored against query a only. ``hard_negatives_mask``: (Nq, K, Rc) bool.
        labels: (Nq,) int64 index in ``c`` of each query's positive; default arange(Nq).
        reduction: "mean" or "sum" over queries.
        return_group_losses: also return the per-group losses (G,).

    Returns:
        ``loss = sum_g weights[g] * loss_g / G``, or ``(loss, group_losses)``.
    """
    V.check_embeddings(q, c)
    nq, rq, d = q.shape
    nc, rc = c.shape[0], c.shape[1]
    groups = V.normalize_groups(groups, rq, rc)
    q_mask = V.check_mask("q_mask", q_mask, (nq, rq), "(Nq, Rq)", q.device)
    c_mask = V.check_mask("c_mask", c_mask, (nc, rc), "(Nc, Rc)", q.device)
    if hard_negatives is None:
        if hard_negatives_mask is not None:
            raise ValueError("hard_negatives_mask was given without hard_negatives")
        hard_negatives = q.new_empty((nq, 0, rc, d))
    else:
        V.check_embeddings(q, hard_negatives, "hard_negatives", "(Nq, K, Rc, D)")
        if hard_negatives.shape[0] != nq or hard_negatives.shape[2] != rc:
            raise ValueError(
                f"hard_negatives must have shape (Nq, K, Rc, D) = ({nq}, K, {rc}, {d}), "
                f"got {tuple(hard_negatives.shape)}"
            )
    hn_mask = V.check_mask(
        "hard_negatives_mask", hard_negatives_mask, hard_negatives.shape[:3], "(Nq, K, Rc)", q.device
    )
    labels = V.check_labels(labels, nq, nc, q.device)
    weights = V.check_weights(weights, len(groups))
    temperature = V.check_temperature(temperature)
    reduction = V.check_reduction(reduction)

    impl = select_backend(backend, q.device, q.dtype, groups)
    terms = impl.infonce_terms(
        q, c, hard_negatives, labels, groups, 1.0 / temperature, q_mask, c_mask, hn_mask
    )  # (G, Nq)
    group_losses = terms.sum(dim=1)
    if reduction == "mean":
        group_losses = group_losses / max(nq, 1)  # an empty batch has loss 0, not NaN
    if weights is None:
        loss = group_losses.sum() / len(groups)
    else:
        w = torch.as_tensor(weights, dtype=group_losses.dtype, device=group_losses.device)
        loss = (w * group_losses).sum() / len(groups)
    return (loss, group_losses) if return_group_losses else loss
