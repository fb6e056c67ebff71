"""Public functional API: argument checking, backend dispatch, loss assembly.

Scores, for each Matryoshka group g = (r_q, r_c):

    s_g(a, b) = sum_{i < r_q, q_mask[a, i]}  max_{j < r_c, c_mask[b, j]}  <q[a, i], c[b, j]>

Loss, with logits_g[a] = concat(s_g(a, c[:]), s_g(a, hard_negatives[a, :])) / temperature:

    loss = sum_g w_g * cross_entropy(logits_g, labels, reduction) / G

Backends return per-query cross-entropy terms (G, Nq); the reduction and the weighting
happen here, on G * Nq numbers.

Semantics shared by every backend (tests/test_nonfinite.py, tests/test_maxsim.py):

* masks: True marks a valid token. A masked token never wins a max, gets a zero gradient
  and is never read (NaN or inf there changes nothing). A query token whose prefix holds no
  valid candidate token contributes 0.
* ties: the gradient of a max goes to the lowest maximising index.
* non-finite values in valid tokens follow torch: a NaN similarity is the maximum (the
  lowest NaN index is the argmax), so it reaches every score, loss and gradient that reads
  it; -inf / +inf similarities are ordinary values (a prefix of -inf similarities scores
  -inf, not 0).
* no host-device synchronisation: every check here uses shapes, dtypes and devices only;
  label values are checked inside the ops (on the host for CPU tensors, by a device-side
  assert for GPU tensors).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _validation as V
from .backends import select_backend

DEFAULT_GROUPS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))


def _needs_gradient(*tensors) -> bool:
    """Whether autograd will differentiate through these inputs: a backend that can then
    keeps what its backward needs (the cpu backend saves the maxsim argmax)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
        q: (Nq, Rq, D) query token embeddings, float32 / float16 / bfloat16 (float64 on the
            reference and cpu backends). Any strides.
        c: (Nc, Rc, D) candidate token embeddings, same dtype and device as ``q``.
        groups: (r_q, r_c) prefix budgets, 1 <= r_q <= Rq, 1 <= r_c <= Rc, in any order.
            ``None`` means the single full budget ((Rq, Rc),).
        q_mask: optional (Nq, Rq) bool, True marks a valid query token.
        c_mask: optional (Nc, Rc) bool, True marks a valid candidate token.
        backend: None/"auto", "reference", "cpu", "triton" or "cuda"
            (``METAEMBED_BACKEND`` is honoured when None).

    Returns:
        (G, Nq, Nc) scores in the order of ``groups``: float32, or float64 for float64
        inputs (accumulation is fp32 for 16- and 32-bit inputs). Differentiable w.r.t.
        ``q`` and ``c``; the gradient of a max goes to the lowest maximising index. NaN in a
        valid token propagates to every score that reads it (see the module docstring).
    """
    V.check_embeddings(q, c)
    groups = V.normalize_groups(groups, q.shape[1], c.shape[1])
    q_mask = V.check_mask("q_mask", q_mask, q.shape[:2], "(Nq, Rq)", q.device)
    c_mask = V.check_mask("c_mask", c_mask, c.shape[:2], "(Nc, Rc)", q.device)
    impl = select_backend(backend, q.device, q.dtype, groups)
    return impl.maxsim_grouped(q, c, groups, q_mask, c_mask, _needs_gradient(q, c))


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


def maxsim_paired_grouped(
    q: torch.Tensor,
    c: torch.Tensor,
    groups: Optional[Sequence[Tuple[int, int]]] = None,
    *,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Each query against its own candidates (distillation, reranking, pairwise losses).

    Args:
        q: (B, Rq, D) query token embeddings.
        c: (B, N, Rc, D) candidates: row b holds query b's own N candidates. N = 1 gives
            aligned pairwise scores.
        groups: (r_q, r_c) budgets as for ``maxsim_grouped``; ``None`` means ((Rq, Rc),).
        q_mask: optional (B, Rq) bool; c_mask: optional (B, N, Rc) bool.
        backend: as for ``maxsim_grouped``.

    Returns:
        (G, B, N) scores, ``out[g, b, n] = s_g(q[b], c[b, n])`` with exactly the semantics of
        ``maxsim_grouped`` (masks, ties, non-finite values); float32 (float64 for float64
        inputs); differentiable w.r.t. ``q`` and ``c``. The B*N*Rq*Rc similarity tensor is
        never materialised by the kernel backends.
    """
    V.check_paired_embeddings(q, c)
    groups = V.normalize_groups(groups, q.shape[1], c.shape[2])
    q_mask = V.check_mask("q_mask", q_mask, q.shape[:2], "(B, Rq)", q.device)
    c_mask = V.check_mask("c_mask", c_mask, c.shape[:3], "(B, N, Rc)", q.device)
    impl = select_backend(backend, q.device, q.dtype, groups)
    return impl.maxsim_paired_grouped(q, c, groups, q_mask, c_mask, _needs_gradient(q, c))


def maxsim_paired(
    q: torch.Tensor,
    c: torch.Tensor,
    *,
    q_mask: Optional[torch.Tensor] = None,
    c_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Full-budget per-query scores (B, N): ``maxsim_paired_grouped(q, c)[0]``."""
    return maxsim_paired_grouped(q, c, None, q_mask=q_mask, c_mask=c_mask, backend=backend)[0]


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
        q: (Nq, Rq, D) queries; c: (Nc, Rc, D) candidates shared by all queries (in-batch
            negatives). Same dtype and device; any strides.
        groups: (r_q, r_c) budgets; ``None`` means ((Rq, Rc),). MetaEmbed training uses
            ``DEFAULT_GROUPS``.
        weights: optional per-group weights (G,), default 1.
        temperature: finite and > 0; logits are scores / temperature (default 0.03).
        hard_negatives: optional (Nq, K, Rc, D); row a holds query a's own K negatives,
            scored against query a only.
        hard_negatives_mask: optional (Nq, K, Rc) bool, True marks a valid token.
        q_mask: optional (Nq, Rq) bool; c_mask: optional (Nc, Rc) bool (as for
            ``maxsim_grouped``).
        labels: (Nq,) int64 index in ``c`` of each query's positive; default arange(Nq),
            which needs Nq <= Nc. Values outside [0, Nc) raise ValueError naming labels (on
            GPU tensors: a device-side assert, without a host sync).
        reduction: "mean" or "sum" over queries.
        return_group_losses: also return the per-group losses (G,).
        backend: None/"auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        ``loss = sum_g weights[g] * loss_g / G`` (a 0-dim float32 tensor, float64 for
        float64 inputs), or ``(loss, group_losses)``. Gradients flow to ``q``, ``c`` and
        ``hard_negatives``; only the ones autograd needs are computed. A NaN in a valid
        token makes the loss and gradients NaN, as in torch.
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
    # When q will need a gradient, a backend that can (cpu) computes it in the forward's pass.
    fuse_dq = q.requires_grad and torch.is_grad_enabled()
    terms = impl.infonce_terms(
        q, c, hard_negatives, labels, groups, 1.0 / temperature, q_mask, c_mask, hn_mask, fuse_dq
    )  # (G, Nq)
    group_losses = terms.sum(dim=1)
    if reduction == "mean" and nq > 0:  # an empty batch has loss 0, not NaN
        group_losses = group_losses / nq
    if weights is None:
        loss = group_losses.sum() / len(groups)
    else:
        w = torch.as_tensor(weights, dtype=group_losses.dtype, device=group_losses.device)
        loss = (w * group_losses).sum() / len(groups)
    return (loss, group_losses) if return_group_losses else loss
