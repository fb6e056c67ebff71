"""PyLate 1.6 (``pylate.scores``, ``pylate.losses``, ``pylate.rank``) on our kernels.

    from metaembed_kernels.integrations import pylate as me_pylate
    loss = pylate.losses.Contrastive(model, score_metric=me_pylate.ColBERTScores())
    loss = pylate.losses.Contrastive(model, score_metric=me_pylate.ColBERTScores(budget=(8, 16)))
    me_pylate.patch()     # or: every PyLate scoring entry point at once; me_pylate.unpatch()

PyLate's convention, reproduced exactly: masks are *multiplied* into the similarities, so a
masked or padded document token has similarity 0 and wins the max when every real similarity of
that query token is negative, and a masked query token adds 0. Since
``<q_i * m_i, d_j * n_j> = m_i * n_j * <q_i, d_j>``, the adapter multiplies the masks into the
embeddings (a copy the size of the input) and runs the kernel without masks: the similarity
tensor ``(Nq, Nd, Lq, Ld)`` that PyLate builds is never formed. The output dtype is PyLate's
(the embeddings' dtype promoted with the masks' dtypes); accumulation is fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _common
from ._patching import Patcher

__all__ = ["ColBERTScores", "colbert_kd_scores", "colbert_scores", "colbert_scores_pairwise",
           "is_patched", "patch", "unpatch"]


def _output_dtype(x: torch.Tensor, *masks) -> torch.dtype:
    """PyLate's einsum keeps the embeddings' dtype; ``scores * mask`` then promotes."""
    dtype = x.dtype
    for m in masks:
        if m is not None:
            dtype = torch.promote_types(dtype, m.dtype)
    return dtype


def _apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor], name: str, layout: str) -> torch.Tensor:
    """x (..., L, H) * mask (..., L): masked tokens become zero vectors (similarity 0)."""
    if mask is None:
        return x
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:-1]:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have shape {layout} = {tuple(x.shape[:-1])}, got {got}")
    return x * mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)


def _inputs(queries_embeddings, documents_embeddings, queries_mask, documents_mask):
    q = _common.to_tensor(queries_embeddings)
    d = _common.to_tensor(documents_embeddings)
    qm = None if queries_mask is None else _common.to_tensor(queries_mask)
    dm = None if documents_mask is None else _common.to_tensor(documents_mask)
    return q, d, qm, dm


def _scores(q, d, qm, dm, budget=None) -> torch.Tensor:
    """q (Nq, Lq, H), d (Nd, Ld, H) -> (Nq, Nd) in PyLate's dtype."""
    out_dtype = _output_dtype(q, qm, dm)
    qx = _apply_mask(q, qm, "queries_mask", "(Nq, Lq)")
    dx = _apply_mask(d, dm, "documents_mask", "(Nd, Ld)")
    return _common.score(qx, dx, budget).to(out_dtype)


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``pylate.scores.colbert_scores`` on our kernel: (Nq, Lq, H) x (Nd, Ld, H) -> (Nq, Nd).

    ``backend`` (PyLate's own switch) is accepted and ignored.
    """
    q, d, qm, dm = _inputs(queries_embeddings, documents_embeddings, queries_mask, documents_mask)
    return _scores(q, d, qm, dm)


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """``pylate.scores.colbert_kd_scores``: q (B, Lq, H), d (B, N, Ld, H) -> (B, N), each query
    against its own N documents (knowledge distillation)."""
    q, d, qm, dm = _inputs(queries_embeddings, documents_embeddings, queries_mask, documents_mask)
    out_dtype = _output_dtype(q, qm, dm)
    qx = _apply_mask(q, qm, "queries_mask", "(B, Lq)")
    dx = _apply_mask(d, dm, "documents_mask", "(B, N, Ld)")
    return _common.score_paired(qx, dx).to(out_dtype)


def colbert_scores_pairwise(queries_embeddings, documents_embeddings, backend: Optional[str] = None) -> torch.Tensor:
    """``pylate.scores.colbert_scores_pairwise``: score of query i against document i -> (B,).

    PyLate loops over the pairs without padding, so ragged lists are padded here with tokens
    *excluded* by masks (not zero tokens), which is the same as their absence.
    """
    if isinstance(queries_embeddings, torch.Tensor) and isinstance(documents_embeddings, torch.Tensor):
        q, d, q_mask, d_mask = queries_embeddings, documents_embeddings, None, None
    else:
        q_items = [_common.to_tensor(x) for x in queries_embeddings]
        d_items = [_common.to_tensor(x) for x in documents_embeddings]
        if len(q_items) != len(d_items):
            raise ValueError(f"queries_embeddings and documents_embeddings must hold as many items, "
                             f"got {len(q_items)} and {len(d_items)}")
        if not q_items:
            raise ValueError("colbert_scores_pairwise needs at least one pair")
        q, q_len = _common.pad_ragged(q_items)
        d, d_len = _common.pad_ragged(d_items)
        q_mask = _common.length_mask(q_len, q.shape[1], q.device)
        d_mask = _common.length_mask(d_len, d.shape[1], d.device)
    if q.dim() != 3 or d.dim() != 3 or q.shape[0] != d.shape[0]:
        raise ValueError(f"queries_embeddings (B, Lq, H) and documents_embeddings (B, Ld, H) must pair up, "
                         f"got {tuple(q.shape)} and {tuple(d.shape)}")
    scores = _common.score_paired(q, d.unsqueeze(1), q_mask=q_mask,
                                  c_mask=None if d_mask is None else d_mask.unsqueeze(1))
    return scores[:, 0].to(q.dtype)


class ColBERTScores:
    """``score_metric`` for ``pylate.losses.Contrastive`` / ``CachedContrastive``.

    ``__call__(q (Q, Qt, H), docs (Qd, N, Dt, H), queries_mask=(Q, Qt), documents_mask=(Qd, N, Dt))``
    returns (Q, Qd * N), query-major like PyLate's: column ``j * N + k`` is the k-th document of
    doc group j, so with Q == Qd the positive of query i sits at column ``i * N``. All Qd * N
    documents are scored in one kernel call.

    Args:
        budget: None (every token), or (r_q, r_c): score with the first r_q query and r_c document
            token embeddings only (MetaEmbed's Matryoshka prefixes), so a MetaEmbed model trains
            inside PyLate at one budget.
    """

    def __init__(self, budget: Optional[Tuple[int, int]] = None):
        _common.groups_of(budget)  # validates
        self.budget = None if budget is None else tuple(budget)

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                 backend: Optional[str] = None) -> torch.Tensor:
        q, d, qm, dm = _inputs(queries_embeddings, documents_embeddings, queries_mask, documents_mask)
        if d.dim() != 4:
            raise ValueError(f"documents_embeddings must have shape (Qd, N, Dt, H), got {tuple(d.shape)}")
        if dm is not None and dm.shape != d.shape[:3]:
            raise ValueError(f"documents_mask must have shape (Qd, N, Dt) = {tuple(d.shape[:3])}, "
                             f"got {tuple(dm.shape)}")
        flat_d = d.reshape(-1, *d.shape[2:])  # (Qd * N, Dt, H): row j * N + k
        flat_m = None if dm is None else dm.reshape(-1, dm.shape[-1])
        return _scores(q, flat_d, qm, flat_m, self.budget)

    def get_config_dict(self) -> dict:
        return {"budget": self.budget}

    def __repr__(self) -> str:
        return f"ColBERTScores(budget={self.budget})"


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
_HOST_MODULES = (
    "pylate.scores", "pylate.scores.colbert", "pylate.scores.similarity_functions", "pylate.rank",
    "pylate.rank.rank", "pylate.losses", "pylate.losses.contrastive", "pylate.losses.cached_contrastive",
    "pylate.losses.distillation", "pylate.evaluation", "pylate.evaluation.colbert_distillation",
    "pylate.evaluation.colbert_triplet", "pylate.retrieve", "pylate.models",
)


def _pairs():
    from pylate.scores import colbert as host

    return [
        (host.colbert_scores, colbert_scores),
        (host.colbert_kd_scores, colbert_kd_scores),
        (host.colbert_scores_pairwise, colbert_scores_pairwise),
        (host.ColBERTScores, ColBERTScores),
    ]


_PATCHER = Patcher("pylate", _HOST_MODULES, _pairs)


def patch() -> None:
    """Rebind PyLate's ``colbert_scores``, ``colbert_kd_scores``, ``colbert_scores_pairwise`` and
    ``ColBERTScores`` to ours wherever PyLate holds them: ``pylate.scores``, the by-name imports of
    ``rank.rerank`` (so ``retrieve.ColBERT``), the losses (``Contrastive`` / ``CachedContrastive``
    default score metric, ``Distillation``'s default argument), the evaluators and
    ``SimilarityFunction`` (models created afterwards). Idempotent; ``unpatch()`` restores the
    very same objects. A model built before ``patch()`` keeps the similarity function it resolved.
    """
    _PATCHER.patch()


def unpatch() -> None:
    _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.active
