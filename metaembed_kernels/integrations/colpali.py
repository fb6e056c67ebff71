"""colpali-engine 0.3.18 on our kernels, and MetaEmbed's Matryoshka training loss.

    from metaembed_kernels.integrations import colpali as me_colpali
    me_colpali.patch()      # score_multi_vector + the MaxSim inside ColbertLoss & co.; unpatch()
    loss_fn = me_colpali.MatryoshkaColbertLoss()          # MetaEmbed's released loss, fused
    loss = loss_fn(query_embeddings, doc_embeddings, neg_doc_embeddings)

colpali's convention, reproduced exactly: there are no masks; padded tokens are exactly zero
vectors (the models multiply by the attention mask after normalising), so a pad has similarity
0 and wins the max when every real similarity is negative. Our kernel scores zero vectors the
same way, so the adapter passes the zero-padded tensors through unchanged, and never builds
colpali's (B, B, Lq, Ld) einsum.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import functional as F
from . import _common
from ._patching import Patcher

__all__ = ["MatryoshkaColbertLoss", "is_patched", "maxsim_inbatch", "maxsim_kd", "patch",
           "score_multi_vector", "unpatch"]

METAEMBED_MRL_GROUPS = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0), (8, 16, 1.0), (16, 64, 1.0))


def maxsim_inbatch(query: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """``colpali_engine.utils.maxsim.maxsim_inbatch``: zero-padded query (Bq, Lq, d) and doc
    (Bd, Ld, d) -> (Bq, Bd) scores, in the input dtype as colpali returns them."""
    return _common.score(query, doc).to(query.dtype)


def maxsim_kd(query: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """``colpali_engine.utils.maxsim.maxsim_kd``: query (B, Lq, d) against its own candidates
    doc (B, N, Ld, d) -> (B, N), in the input dtype."""
    return _common.score_paired(query, doc).to(query.dtype)


def _auto_device() -> torch.device:
    """colpali's ``get_torch_device("auto")``: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _pad(items, device) -> torch.Tensor:
    if isinstance(items, torch.Tensor):
        return items.to(device)
    return torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True, padding_value=0).to(device)


def score_multi_vector(qs: Union[torch.Tensor, List[torch.Tensor]], ps: Union[torch.Tensor, List[torch.Tensor]],
                       batch_size: int = 128, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """``BaseVisualRetrieverProcessor.score_multi_vector``: late-interaction scores (Nq, Np), fp32,
    on the CPU, from lists of ragged (L_i, d) tensors or padded (N, L, d) tensors.

    As colpali does, passages are zero-padded per chunk of ``batch_size`` (a zero pad counts as a
    similarity-0 token, so the chunking is part of the result when similarities are negative);
    queries are scored all at once, which cannot change a score: a zero query token adds 0.
    """
    device = torch.device(device) if device is not None else _auto_device()
    if len(qs) == 0:
        raise ValueError("No queries provided")
    if len(ps) == 0:
        raise ValueError("No passages provided")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    q = _pad(qs, device)
    chunks = [_common.score(q, _pad(ps[j : j + batch_size], device)).cpu() for j in range(0, len(ps), batch_size)]
    return torch.cat(chunks, dim=1).to(torch.float32)


def _as_negatives(neg: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if neg is None:
        return None
    if not isinstance(neg, torch.Tensor) or neg.dim() not in (3, 4) or neg.shape[0] != batch:
        got = tuple(neg.shape) if isinstance(neg, torch.Tensor) else type(neg).__name__
        raise ValueError(f"neg_doc_embeddings must have shape (B, K, L, D) or (B, L, D) with B = {batch}, got {got}")
    return neg.unsqueeze(1) if neg.dim() == 3 else neg


def _pad_tokens(x: torch.Tensor, length: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pad the token axis (dim -2) to ``length`` with tokens excluded by a mask (as if absent)."""
    extra = length - x.shape[-2]
    if extra == 0:
        return x, None
    mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    x = torch.nn.functional.pad(x, (0, 0, 0, extra))
    return x, torch.nn.functional.pad(mask, (0, extra), value=False)


class MatryoshkaColbertLoss(nn.Module):
    """MetaEmbed's Matryoshka multi-vector InfoNCE as a colpali-engine loss, on the fused kernel.

    For each group (r_q, r_c, w): the logits of query i are its scores, at budget (r_q, r_c),
    against every ``doc_embeddings`` row (in-batch negatives) followed by its scores against its
    own ``neg_doc_embeddings[i]``, divided by ``temperature``; the target is ``i + offset``.
    ``loss = sum_g w_g * CE_g / G`` (mean over queries). The Nq x Nd x Lq x Ld similarity tensor
    that the released loss slices per group is never built: ``matryoshka_infonce`` computes every
    group from one pass. After a call, ``group_losses`` holds the (G,) per-group losses (detached).

    Args:
        mrl_groups: (r_q, r_c, weight) triples.
        temperature: logit temperature (0.03 in MetaEmbed).
    """

    def __init__(self, mrl_groups: Sequence[Sequence[float]] = METAEMBED_MRL_GROUPS, temperature: float = 0.03):
        super().__init__()
        groups, weights = [], []
        for g in mrl_groups:
            if len(g) != 3:
                raise ValueError(f"mrl_groups entries must be (r_q, r_c, weight), got {g!r}")
            groups.append((g[0], g[1]))
            weights.append(float(g[2]))
        self.groups: Tuple[Tuple[int, int], ...] = tuple(groups)
        self.weights: Tuple[float, ...] = tuple(weights)
        self.temperature = temperature
        self.group_losses: Optional[torch.Tensor] = None

    def forward(self, query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor,
                neg_doc_embeddings: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
        """query (B, Lq, D), doc (Bd, Ld, D), neg (B, K, Ln, D) or (B, Ln, D) -> scalar loss."""
        q, c = query_embeddings, doc_embeddings
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError("query_embeddings must be a (B, Lq, D) tensor")
        if not isinstance(c, torch.Tensor) or c.dim() != 3:
            raise ValueError("doc_embeddings must be a (Bd, Ld, D) tensor")
        neg = _as_negatives(neg_doc_embeddings, q.shape[0])
        c_mask = neg_mask = None
        if neg is not None and neg.shape[2] != c.shape[1]:  # one token count for both
            length = max(neg.shape[2], c.shape[1])
            c, c_mask = _pad_tokens(c, length)
            neg, neg_mask = _pad_tokens(neg, length)
        labels = torch.arange(q.shape[0], device=q.device) + offset
        loss, group_losses = F.matryoshka_infonce(
            q, c, self.groups, weights=self.weights, temperature=self.temperature, hard_negatives=neg,
            hard_negatives_mask=neg_mask, c_mask=c_mask, labels=labels, return_group_losses=True,
        )
        self.group_losses = group_losses.detach()
        return loss

    def extra_repr(self) -> str:
        groups = tuple((rq, rc, w) for (rq, rc), w in zip(self.groups, self.weights))
        return f"mrl_groups={groups}, temperature={self.temperature}"


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
_HOST_MODULES = ("colpali_engine.utils.maxsim", "colpali_engine.utils.processing_utils",
                 "colpali_engine.loss", "colpali_engine.loss.late_interaction_losses")


def _pairs():
    from colpali_engine.utils import maxsim as host

    return [(host.maxsim_inbatch, maxsim_inbatch), (host.maxsim_kd, maxsim_kd)]


def _attributes():
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    return [(BaseVisualRetrieverProcessor, "score_multi_vector", staticmethod(score_multi_vector))]


_PATCHER = Patcher("colpali_engine", _HOST_MODULES, _pairs, _attributes)


def patch() -> None:
    """Put ``BaseVisualRetrieverProcessor.score_multi_vector`` (hence every processor's
    ``score``) and the in-batch / KD MaxSim that ``ColbertLoss``, ``ColbertPairwiseCELoss``,
    ``ColbertNegativeCELoss`` and ``ColbertPairwiseNegativeCELoss`` call on our kernels. Losses
    built with ``use_smooth_max=True`` keep colpali's own log-sum-exp path (colpali routes them
    around these functions). Idempotent; ``unpatch()`` restores the very same objects."""
    _PATCHER.patch()


def unpatch() -> None:
    _PATCHER.unpatch()


def is_patched() -> bool:
    return _PATCHER.active
