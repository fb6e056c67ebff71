"""Sharded search over torch.distributed: local top-k on every rank, all-gather, merge.

Each rank holds a shard of the corpus in its own MultiVectorIndex, with *global* ids (ids
unique across the shards: pass ``ids=`` to ``add``). A search with ``process_group=pg``:

    1. every rank computes its exact local top-k, (G, Nq, k) scores and ids;
    2. the (score, id) lists are all-gathered: Nq * k * G * (4 + 8) bytes per rank;
    3. every rank merges the world_size * k entries per query with ``order_topk``.

Because the result order is a total order on (score, id), the merge of exact local top-k
lists equals the top k of one index over the union of the shards. Every rank must call with
the same Nq, k and groups (a collective); the shapes are checked first, collectively, so a
mismatch raises ValueError on every rank instead of hanging. The tensors go through the
process group's backend as they are: CPU tensors with gloo, CUDA tensors with NCCL.
"""
from __future__ import annotations

import torch

from .search import order_topk


def _dist():
    import torch.distributed as dist

    return dist


def check_group(process_group) -> None:
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")


def merge_across_ranks(scores: torch.Tensor, ids: torch.Tensor, k: int, process_group):
    """scores, ids (G, Nq, k) of this rank's shard -> the global top-k, on every rank."""
    dist = _dist()
    world = dist.get_world_size(process_group)
    shape = torch.tensor(list(scores.shape), dtype=torch.int64, device=scores.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=process_group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError("process_group search: every rank must search with the same number of queries, k and "
                         f"budgets; got result shapes {[tuple(s.tolist()) for s in shapes]}")
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_scores, scores.contiguous(), group=process_group)
    dist.all_gather(all_ids, ids.contiguous(), group=process_group)
    merged_scores, merged_ids = order_topk(torch.cat(all_scores, dim=-1), torch.cat(all_ids, dim=-1), k)
    return merged_scores, merged_ids
