"""sentence-transformers 6.2 (``util.maxsim``, ``MultiVectorEncoder`` and its losses) on our kernels.

    from metaembed_kernels.integrations import sentence_transformers as me_st
    scores = me_st.maxsim(query_embeddings, document_embeddings)        # as util.maxsim
    loss = MultiVectorMultipleNegativesRankingLoss(model, similarity_fct=me_st.MaxSim())
    loss = MultiVectorDistillKLDivLoss(model, similarity_fct=me_st.MaxSim(form="kd"))
    loss = MultiVectorMarginMSELoss(model, similarity_fct=me_st.MaxSim())
    me_st.patch()     # or: util.maxsim and the losses' default scorers everywhere; me_st.unpatch()

The convention of ``util.maxsim``, reproduced exactly (it differs from PyLate's):

* masked document tokens are *excluded* from the max (never win), which is our kernel's own
  semantics, so the document mask goes to the kernel as ``c_mask``;
* a document with no valid token scores the sentinel -1e9 (before length normalisation);
* the query mask *multiplies* each query token's max: a bool mask goes to the kernel as
  ``q_mask``, a float or integer mask weights the query vectors (``max_j <w q_i, d_j> =
  w max_j <q_i, d_j>`` for w >= 0);
* without masks, a ragged list's padding and, for padded tensors, all-zero token rows are masked;
* scores are float32 (ours accumulate in fp32 throughout; ST rounds each similarity to the
  input dtype first, so bf16 / fp16 results agree within that rounding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import _common
from ._patching import Patcher

__all__ = ["EMPTY_DOCUMENT_SCORE", "MaxSim", "colbert_kd_scores", "colbert_scores", "colbert_scores_pairwise",
           "is_patched", "maxsim", "maxsim_pairwise", "patch", "unpatch"]

EMPTY_DOCUMENT_SCORE = -1e9  # sentence_transformers.util.similarity._EMPTY_DOCUMENT_SCORE


# ---------------------------------------------------------------------------------------------
# inputs: ST's accepted forms -> padded tensors and canonical masks
# ---------------------------------------------------------------------------------------------
def _as_mask(mask, name: str) -> Optional[torch.Tensor]:
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    if isinstance(mask, (list, tuple)):
        return torch.nn.utils.rnn.pad_sequence([_common.to_tensor(m) for m in mask], batch_first=True)
    if isinstance(mask, np.ndarray):
        return torch.from_numpy(mask)
    raise TypeError(f"`{name}` must be a tensor, an ndarray, or a list of per-item masks, not {type(mask).__name__}.")


def _side(embeddings, mask, name: str):
    """One side of a call -> (padded (B, L, D) float tensor, mask or None, derived bool mask or None,
    batch size). A 2-D input is a batch of one; a ragged list is zero-padded."""
    mask = _as_mask(mask, name)
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2:
        embeddings = embeddings.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
    derived = None
    if isinstance(embeddings, (list, tuple)):
        if len(embeddings) == 0:
            return None, mask, None, 0
        items = [_common.to_tensor(t) for t in embeddings]
        items = [t if t.is_floating_point() else t.float() for t in items]
        padded, lengths = _common.pad_ragged(items)
        if mask is None:
            derived = _common.length_mask(lengths, padded.shape[1], padded.device)
    elif isinstance(embeddings, torch.Tensor):
        padded = embeddings if embeddings.is_floating_point() else embeddings.float()
        if mask is None and padded.dim() == 3:
            derived = padded.ne(0).any(dim=-1)  # all-zero rows are padding
    else:
        raise TypeError(f"embeddings must be a tensor, an ndarray or a list of (tokens, dim) tensors, "
                        f"got {type(embeddings).__name__}")
    if mask is not None and mask.shape[-1] != padded.shape[-2]:
        raise ValueError(f"`{name}` covers {mask.shape[-1]} tokens, but the padded embeddings have {padded.shape[-2]}.")
    return padded, mask, derived, padded.shape[0]


def _query_mask(q: torch.Tensor, mask: Optional[torch.Tensor], derived: Optional[torch.Tensor]):
    """-> (query embeddings, bool q_mask, per-query real-token count for MeanMaxSim)."""
    if mask is None:
        q_mask = derived
        return q, q_mask, None if q_mask is None else q_mask.sum(-1)
    mask = mask.to(q.device)
    q_mask = mask.bool()
    if mask.dtype != torch.bool:  # weights multiply the per-token maxima
        q = q * mask.to(q.dtype).unsqueeze(-1)
    return q, q_mask, q_mask.sum(-1)


def _finish(scores, c_valid, counts, q_len, length_normalize, empty_axis_shape):
    """Sentinel for documents without a valid token, then optional length normalisation."""
    if c_valid is not None:
        scores = scores.masked_fill(~c_valid.reshape(empty_axis_shape), EMPTY_DOCUMENT_SCORE)
    if length_normalize:
        if counts is None:
            counts = torch.full((scores.shape[0],), q_len, device=scores.device)
        counts = counts.to(device=scores.device, dtype=scores.dtype).clamp(min=1)
        scores = scores / counts.reshape(-1, *([1] * (scores.dim() - 1)))
    return scores


def _devices(a, b, device):
    def dev(x):
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return x[0].device
        return None
    result = dev(b) or dev(a) or torch.device("cpu")
    return result, (torch.device(device) if device is not None else result)


def _doc_valid(mask, derived, rc_budget):
    """(…, Lb) bool of scoreable document tokens (None: all valid), within the budget prefix."""
    valid = mask.bool() if mask is not None else derived
    if valid is not None and rc_budget is not None:
        valid = valid[..., :rc_budget]
    return valid


def _budgeted_validity_and_counts(c_mask, q_mask, counts, budget):
    """Under a budget (r_q, r_c): which documents hold a valid token among their first r_c, and
    each query's valid-token count among its first r_q (None where there is nothing to count)."""
    valid = _doc_valid(c_mask, None, None if budget is None else budget[1])
    valid = None if valid is None else valid.any(-1)
    if counts is not None and budget is not None:
        counts = q_mask[:, : budget[0]].sum(-1)
    return valid, counts


def _score_sides(a, b, a_mask, b_mask, *, paired: bool, budget=None, length_normalize=False, device=None):
    """ST semantics for in-batch ((A, Lq, D) x (B, Lb, D) -> (A, B)) or aligned pairs (-> (A,))."""
    q, qm, q_derived, n_a = _side(a, a_mask, "a_mask")
    d, dm, d_derived, n_b = _side(b, b_mask, "b_mask")
    result_device, scoring_device = _devices(a, b, device)
    if paired and n_a != n_b:
        raise ValueError(f"`a` and `b` must hold the same number of items to score as pairs, got {n_a} and {n_b}.")
    shape = (n_a,) if paired else (n_a, n_b)
    if n_a == 0 or n_b == 0:
        return torch.zeros(shape, dtype=torch.float32, device=result_device)
    q, d = q.to(scoring_device), d.to(scoring_device)
    if qm is not None and not paired:
        qm = qm.expand(n_a, -1)
    if dm is not None:
        dm = dm.to(scoring_device)
        if not paired:
            dm = dm.expand(n_b, -1)
    q, q_mask, counts = _query_mask(q, qm, None if q_derived is None else q_derived.to(scoring_device))
    c_mask = dm.bool() if dm is not None else (None if d_derived is None else d_derived.to(scoring_device))
    empty_shape = (n_a,) if paired else (1, n_b)
    if q.shape[1] == 0 or d.shape[1] == 0:  # nothing to take a max over / nothing to sum
        scores = torch.zeros(shape, dtype=torch.float32, device=scoring_device)
        valid = torch.zeros(n_b, dtype=torch.bool, device=scoring_device) if d.shape[1] == 0 else (
            None if c_mask is None else c_mask.any(-1))
    else:
        if paired:
            scores = _common.score_paired(q, d.unsqueeze(1), budget, q_mask,
                                          None if c_mask is None else c_mask.unsqueeze(1))[:, 0]
        else:
            scores = _common.score(q, d, budget, q_mask, c_mask)
        valid, counts = _budgeted_validity_and_counts(c_mask, q_mask, counts, budget)
    q_len = q.shape[1] if budget is None else min(q.shape[1], budget[0])
    return _finish(scores, valid, counts, q_len, length_normalize, empty_shape).to(result_device)


# ---------------------------------------------------------------------------------------------
# util.similarity
# ---------------------------------------------------------------------------------------------
def maxsim(a, b, a_mask=None, b_mask=None, chunk_elements: Optional[int] = None, length_normalize: bool = False,
           device=None) -> torch.Tensor:
    """``sentence_transformers.util.maxsim``: (A, B) float32 MaxSim scores of every query in ``a``
    against every document in ``b`` (padded tensors, ragged lists or a single 2-D item each).
    ``chunk_elements`` is accepted and unused: the kernel never materialises the similarities."""
    return _score_sides(a, b, a_mask, b_mask, paired=False, length_normalize=length_normalize, device=device)


def maxsim_pairwise(a, b, a_mask=None, b_mask=None, chunk_elements: Optional[int] = None,
                    length_normalize: bool = False, device=None) -> torch.Tensor:
    """``sentence_transformers.util.maxsim_pairwise``: (A,) float32 scores of a[i] against b[i]."""
    return _score_sides(a, b, a_mask, b_mask, paired=True, length_normalize=length_normalize, device=device)


# ---------------------------------------------------------------------------------------------
# multi_vector_encoder.scoring: the losses' scorers
# ---------------------------------------------------------------------------------------------
def _stacked(queries_embeddings, documents_embeddings, queries_mask, documents_mask, budget, length_normalize,
             form):
    q = _common.to_tensor(queries_embeddings)
    d = _common.to_tensor(documents_embeddings)
    qm = None if queries_mask is None else _common.to_tensor(queries_mask)
    dm = None if documents_mask is None else _common.to_tensor(documents_mask)
    if d.dim() != 4:
        raise ValueError(f"documents_embeddings must have shape (Q, N, d_tokens, dim), got {tuple(d.shape)}")
    if dm is not None and dm.shape != d.shape[:3]:
        raise ValueError(f"documents_mask must have shape (Q, N, d_tokens) = {tuple(d.shape[:3])}, got {tuple(dm.shape)}")
    n_docs, n = d.shape[0], d.shape[1]
    if form == "kd":  # query b against its own n documents: (B, n_ways)
        if q.shape[0] != n_docs:
            raise ValueError(f"queries ({q.shape[0]}) and document groups ({n_docs}) must pair up")
        q_, qm_, q_derived, _ = _side(q, qm, "queries_mask")
        derived_d = d.ne(0).any(-1) if dm is None else None
        c_mask = dm.bool() if dm is not None else derived_d
        q_, q_mask, counts = _query_mask(q_, qm_, q_derived)
        if q_.shape[1] == 0 or d.shape[2] == 0:
            scores = torch.zeros((n_docs, n), dtype=torch.float32, device=d.device)
            valid = c_mask.any(-1) if (c_mask is not None and d.shape[2] > 0) else torch.zeros(
                (n_docs, n), dtype=torch.bool, device=d.device)
        else:
            scores = _common.score_paired(q_, d, budget, q_mask, c_mask)
            valid, counts = _budgeted_validity_and_counts(c_mask, q_mask, counts, budget)
        q_len = q_.shape[1] if budget is None else min(q_.shape[1], budget[0])
        return _finish(scores, valid, counts, q_len, length_normalize, (n_docs, n))
    # in-batch, query-major: column j * N + k is document k of group j
    flat_d = d.reshape(n_docs * n, *d.shape[2:])
    flat_m = None if dm is None else dm.reshape(n_docs * n, -1)
    if budget is None:
        return maxsim(q, flat_d, a_mask=qm, b_mask=flat_m, length_normalize=length_normalize)
    return _score_sides(q, flat_d, qm, flat_m, paired=False, budget=budget, length_normalize=length_normalize)


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   chunk_elements: Optional[int] = None, length_normalize: bool = False) -> torch.Tensor:
    """``multi_vector_encoder.scoring.colbert_scores``: q (Q, q_tokens, dim), docs (Qd, N, d_tokens, dim)
    -> (Q, Qd * N) float32, query-major (the default scorer of the ranking losses)."""
    return _stacked(queries_embeddings, documents_embeddings, queries_mask, documents_mask, None,
                    length_normalize, "in_batch")


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      chunk_elements: Optional[int] = None, length_normalize: bool = False) -> torch.Tensor:
    """``multi_vector_encoder.scoring.colbert_kd_scores``: q (B, q_tokens, dim), docs (B, n_ways,
    d_tokens, dim) -> (B, n_ways) float32 (the default scorer of ``MultiVectorDistillKLDivLoss``)."""
    return _stacked(queries_embeddings, documents_embeddings, queries_mask, documents_mask, None,
                    length_normalize, "kd")


def colbert_scores_pairwise(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                            chunk_elements: Optional[int] = None, length_normalize: bool = False) -> torch.Tensor:
    """``multi_vector_encoder.scoring.colbert_scores_pairwise``: (B,) float32 (the default scorer of
    ``MultiVectorMarginMSELoss``)."""
    return maxsim_pairwise(queries_embeddings, documents_embeddings, a_mask=queries_mask, b_mask=documents_mask,
                           length_normalize=length_normalize)


class MaxSim:
    """``similarity_fct`` for the multi-vector losses, in the form each one calls it:

    * documents (Qd, N, d_tokens, dim), ``form=None`` or ``"in_batch"``: (Q, Qd * N) query-major
      scores (``MultiVectorMultipleNegativesRankingLoss`` and its cached variant);
    * documents (B, n_ways, d_tokens, dim), ``form="kd"``: (B, n_ways) scores of each query
      against its own documents (``MultiVectorDistillKLDivLoss``; the shapes alone cannot tell
      the two apart, so this form is asked for by name);
    * documents (B, d_tokens, dim): (B,) aligned pairs (``MultiVectorMarginMSELoss``).

    Args:
        form: None (in-batch for 4-D documents, pairwise for 3-D), "in_batch", "kd" or "pairwise".
        budget: None, or (r_q, r_c) to score with the first r_q query and r_c document token
            embeddings (MetaEmbed's Matryoshka prefixes).
        length_normalize: MeanMaxSim (divide by the number of real query tokens).
    """

    FORMS = (None, "in_batch", "kd", "pairwise")

    def __init__(self, form: Optional[str] = None, budget: Optional[Tuple[int, int]] = None,
                 length_normalize: bool = False):
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        _common.groups_of(budget)
        self.form = form
        self.budget = None if budget is None else tuple(budget)
        self.length_normalize = bool(length_normalize)

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                 **kwargs) -> torch.Tensor:
        d = documents_embeddings
        ndim = d.dim() if isinstance(d, torch.Tensor) else np.ndim(d) if isinstance(d, np.ndarray) else None
        form = self.form or ("in_batch" if ndim == 4 else "pairwise")
        if form == "pairwise":
            return _score_sides(queries_embeddings, documents_embeddings, queries_mask, documents_mask, paired=True,
                                budget=self.budget, length_normalize=self.length_normalize)
        return _stacked(queries_embeddings, documents_embeddings, queries_mask, documents_mask, self.budget,
                        self.length_normalize, form)

    def get_config_dict(self) -> dict:
        return {"form": self.form, "budget": self.budget, "length_normalize": self.length_normalize}

    def __repr__(self) -> str:
        return "MaxSim(" + ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items()) + ")"


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
_HOST_MODULES = (
    "sentence_transformers.util", "sentence_transformers.util.similarity", "sentence_transformers.multi_vector_encoder",
    "sentence_transformers.multi_vector_encoder.scoring", "sentence_transformers.multi_vector_encoder.scoring.colbert",
    "sentence_transformers.multi_vector_encoder.losses", "sentence_transformers.multi_vector_encoder.evaluation",
)


def _pairs():
    from sentence_transformers.multi_vector_encoder.scoring import colbert as host_scoring
    from sentence_transformers.util import similarity as host

    return [
        (host.maxsim, maxsim),
        (host.maxsim_pairwise, maxsim_pairwise),
        (host_scoring.colbert_scores, colbert_scores),
        (host_scoring.colbert_kd_scores, colbert_kd_scores),
        (host_scoring.colbert_scores_pairwise, colbert_scores_pairwise),
    ]


_PATCHER = Patcher("sentence_transformers", _HOST_MODULES, _pairs)


def patch() -> None:
    """Rebind ``maxsim`` / ``maxsim_pairwise`` (in ``util.similarity``, ``util``,
    ``multi_vector_encoder`` and its scoring module: hence ``mean_maxsim``,
    ``SimilarityFunction`` and the evaluators) and the losses' default scorers
    ``colbert_scores`` / ``colbert_kd_scores`` / ``colbert_scores_pairwise`` to ours, wherever
    sentence-transformers imported them by name. Idempotent; ``unpatch()`` restores the very same
    objects. A model that resolved its similarity before ``patch()`` keeps it."""
    _PATCHER.patch()


def unpatch() -> None:
    _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.active
