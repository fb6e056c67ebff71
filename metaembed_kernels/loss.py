"""``MatryoshkaInfoNCELoss``: the MetaEmbed training loss as an ``nn.Module``."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import _validation as V
from .functional import DEFAULT_GROUPS, matryoshka_infonce


def _gather_candidates(c: torch.Tensor, c_mask: Optional[torch.Tensor]):
    """All-gather candidates from every rank; gradients flow back to each rank's shard.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients across
    ranks in its backward, which, combined with DDP's gradient averaging, gives the
    gradient of the mean of the per-rank losses.
    """
    from torch.distributed.nn.functional import all_gather

    c_all = torch.cat(all_gather(c.contiguous()), dim=0)
    if c_mask is not None:
        masks = [torch.empty_like(c_mask) for _ in range(dist.get_world_size())]
        dist.all_gather(masks, c_mask.contiguous())
        c_mask = torch.cat(masks, dim=0)
    return c_all, c_mask


class MatryoshkaInfoNCELoss(nn.Module):
    """sum_g w_g * InfoNCE(s_g / temperature) / G over in-batch and hard negatives.

    Args:
        groups: Matryoshka (r_q, r_c) budgets, default ``DEFAULT_GROUPS``; ``None`` means the
            single full budget (Rq, Rc) of whatever the inputs hold, as in the functional API.
        weights: per-group weights, default 1.
        temperature: softmax temperature, default 0.03.
        gather_across_ranks: all-gather the candidates of every rank of the default
            process group, so that each query is contrasted with the global batch (the
            MetaEmbed recipe). Every rank must pass the same (Nc, Rc, D). Labels, given or
            default ``arange(Nq)``, index the local candidates and are shifted by
            ``rank * Nc``; hard negatives stay local to their query.
        backend: kernel backend, as for ``matryoshka_infonce``.
    """

    def __init__(
        self,
        groups: Optional[Sequence[Tuple[int, int]]] = DEFAULT_GROUPS,
        weights: Optional[Sequence[float]] = None,
        temperature: float = 0.03,
        gather_across_ranks: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.groups = V.check_group_pairs(groups)
        self.weights = V.check_weights(weights, 1 if self.groups is None else len(self.groups))
        self.temperature = V.check_temperature(temperature)
        self.gather_across_ranks = bool(gather_across_ranks)
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        c: torch.Tensor,
        hard_negatives: Optional[torch.Tensor] = None,
        *,
        q_mask: Optional[torch.Tensor] = None,
        c_mask: Optional[torch.Tensor] = None,
        hard_negatives_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The loss of one batch (a 0-dim tensor; see ``matryoshka_infonce``).

        Args:
            q: (Nq, Rq, D) query embeddings.
            c: (Nc, Rc, D) candidates: the positives (``labels``, default arange(Nq)) and
                the in-batch negatives of every query.
            hard_negatives: optional (Nq, K, Rc, D), query a's own K negatives.
            q_mask, c_mask, hard_negatives_mask: optional bool masks, True = valid token.
            labels: optional (Nq,) int64 index of each query's positive in ``c`` (local to
                this rank when ``gather_across_ranks``).
        """
        if self.gather_across_ranks and dist.is_available() and dist.is_initialized():
            if dist.get_world_size() > 1:
                V.check_embeddings(q, c)
                local_nc = c.shape[0]
                labels = V.check_labels(labels, q.shape[0], local_nc, q.device)
                labels = labels + dist.get_rank() * local_nc
                c, c_mask = _gather_candidates(c, c_mask)
        return matryoshka_infonce(
            q,
            c,
            self.groups,
            weights=self.weights,
            temperature=self.temperature,
            hard_negatives=hard_negatives,
            hard_negatives_mask=hard_negatives_mask,
            q_mask=q_mask,
            c_mask=c_mask,
            labels=labels,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, weights={self.weights}, temperature={self.temperature}, "
            f"gather_across_ranks={self.gather_across_ranks}"
        )
