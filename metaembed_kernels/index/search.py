"""Search: top-k over every segment of a store, and the one ordering every merge uses.

Order. Results are sorted by score descending, ties broken by id ascending; padding slots
(fewer than k live candidates) hold id -1 and score -inf and come after every real result.
This is a total order on (score, id), so the top k of any union of partial results is
unique: merging the top-k lists of segments, threads, blocks or ranks in any grouping gives
the same answer as one scan (``order_topk`` is that merge).

Scanners, one per backend (``backends.select_backend`` picks it, as for ``maxsim_grouped``):

* ``cpu``: the C++ op ``metaembed::index_search`` (csrc/cpu/index_*.{h,cpp}) scores and
  selects in one pass over every segment: per thread and query a top-k list (a heap, or
  vector lanes for k <= 16), entered only by candidates that beat its current k-th result
  (tested as each score is finished); it also converts and checks the queries it reads; the
  scores of all candidates never exist at once. ``metaembed::index_score_rows`` scores given
  rows for the cascade's rerank.
* ``triton``: the Triton kernel of ``triton/index_kernels.py`` scores a block of candidates
  straight from the slabs (int8 dequantised in registers), then the block's scores are merged
  into the running top-k (``order_topk``): memory O(G * Nq * (k + block)), never (Nq, N).
* ``reference`` / ``cuda``: the same blockwise loop; each block's prefix vectors are
  gathered (and dequantised) and scored by that backend's ``maxsim_grouped``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _extension
from ..backends import select_backend
from .storage import Store, compute_dtype, slabs_for

NO_ID = -1
_INT64_MAX = torch.iinfo(torch.int64).max
# Candidates per block in the blockwise scanners: bounds the (G, Nq, block) score buffer and
# the gathered vectors.
BLOCK_SCORE_BYTES = 32 << 20
BLOCK_VECTOR_BYTES = 64 << 20


def order_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, *extra: torch.Tensor):
    """Top k of each row of (..., M) candidate lists by (score desc, id asc), padding last.

    Returns (scores (..., k), ids (..., k), *extra gathered the same way); rows with fewer
    than k real entries end with score -inf, id -1 (extra entries: -1).
    """
    is_pad = ids < 0
    id_key = torch.where(is_pad, torch.full_like(ids, _INT64_MAX), ids)
    by_id = torch.sort(id_key, dim=-1, stable=True).indices
    score_key = scores.gather(-1, by_id)
    score_key = torch.where(is_pad.gather(-1, by_id), torch.full_like(score_key, float("-inf")), score_key)
    by_score = torch.sort(score_key, dim=-1, descending=True, stable=True).indices
    order = by_id.gather(-1, by_score)[..., :k]
    out = [scores.gather(-1, order), ids.gather(-1, order)] + [e.gather(-1, order) for e in extra]
    out[0] = torch.where(out[1] < 0, torch.full_like(out[0], float("-inf")), out[0])
    missing = k - order.shape[-1]
    if missing > 0:
        shape = tuple(order.shape[:-1]) + (missing,)
        out[0] = torch.cat([out[0], out[0].new_full(shape, float("-inf"))], dim=-1)
        out[1:] = [torch.cat([t, t.new_full(shape, NO_ID)], dim=-1) for t in out[1:]]
    return tuple(out)


def empty_result(num_groups: int, nq: int, k: int, device):
    scores = torch.full((num_groups, nq, k), float("-inf"), dtype=torch.float32, device=device)
    ids = torch.full((num_groups, nq, k), NO_ID, dtype=torch.int64, device=device)
    return scores, ids, ids.clone()


_cpu_ops_found = False


def _has_cpu_ops() -> bool:
    global _cpu_ops_found
    if _cpu_ops_found:  # once registered, the ops stay (checked once: it runs on every search)
        return True
    if not _extension.is_loaded():
        return False
    try:
        _cpu_ops_found = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed::{op}", "CPU")
                             for op in ("index_search", "index_score_rows"))
    except RuntimeError:  # an extension built before the index ops existed
        return False
    return _cpu_ops_found


def scanner_for(store: Store, groups) -> str:
    """Name of the backend that scans: the one ``maxsim_grouped`` would use for queries in the
    store's compute dtype, except that the compiled extension without the index ops falls back
    to the reference."""
    name = select_backend(None, store.device, compute_dtype(store.dtype), groups).name
    if name == "cpu" and not _has_cpu_ops():
        return "reference"
    return name


def read_queries(store: Store, q: torch.Tensor, q_mask: Optional[torch.Tensor], r_q: int, scanner: str):
    """The queries as ``scanner`` takes them: the C++ op takes them as given and reads,
    converts and checks the first r_q vectors itself, as it packs them (one call: each torch
    op here costs tens of microseconds right after a scan); the other scanners get the first
    r_q vectors in the compute dtype, checked here. Either way a NaN or inf in a valid vector
    the search reads raises ValueError; vectors past r_q or masked out are never read."""
    if scanner == "cpu" and q.shape[0] and store.num_rows:
        return q, q_mask
    q = q[:, :r_q].to(compute_dtype(store.dtype))
    if not q.is_contiguous():
        q = q.contiguous()
    if q_mask is not None:
        q_mask = q_mask[:, :r_q]
    bad = ~torch.isfinite(q.abs().amax(dim=-1))  # max |x| is NaN or inf iff an element is (3x isfinite's speed)
    if q_mask is not None:
        bad &= q_mask
    if bad.numel() and bool(bad.any()):
        raise ValueError("q holds NaN or infinite values in vectors the search reads (the budget's first r_q "
                         "valid ones): no ranking can be made from them")
    return q, q_mask


def _split_groups(groups):
    return [g[0] for g in groups], [g[1] for g in groups]


def _op_lists(store: Store, r_c: int, allowed: Sequence[Optional[torch.Tensor]]):
    data, scales, masks, ids, allow, rows = [], [], [], [], [], []
    for seg, a in zip(store.segments, allowed):
        d, s, m = store.slab_views(seg, r_c)
        data += d
        scales += s or []
        masks += m or []
        ids.append(seg.ids_view())
        rows.append(seg.n)
        if a is not None:
            allow.append(a)
    if allow and len(allow) != len(rows):  # some segments with a filter: every segment gets one
        allow = [a if a is not None else seg.live_view() for seg, a in zip(store.segments, allowed)]
    # none: no list at all, so the scan never tests a row (a byte load and a branch per row)
    return data, scales, masks, ids, allow, rows


# ---- top-k search ----------------------------------------------------------------------

def search(store: Store, q: torch.Tensor, q_mask: Optional[torch.Tensor], groups, k: int,
           allowed: List[Optional[torch.Tensor]], scanner: str):
    """(scores (G, Nq, k) float32, ids (G, Nq, k) int64, rows (G, Nq, k) int64 global row).

    q, q_mask: as ``read_queries`` gave them for ``scanner``. ``allowed[s]``: None (every row
    of segment s is live and wanted) or a bool (n_s,) array of the rows that may be returned
    (live and passing the filter)."""
    G, nq = len(groups), q.shape[0]
    if nq == 0 or store.num_rows == 0:
        return empty_result(G, nq, k, q.device)
    r_c = max(g[1] for g in groups)
    if scanner == "cpu":
        data, scales, masks, ids, allow, rows = _op_lists(store, r_c, allowed)
        rq, rc = _split_groups(groups)
        return torch.ops.metaembed.index_search(q, q_mask, data, scales, masks, ids, allow, rows, store.bounds,
                                                rq, rc, k)
    return _blockwise_search(store, q, q_mask, groups, k, allowed, scanner)


def _block_rows(store: Store, nq: int, num_groups: int, r_c: int) -> int:
    per_candidate_scores = max(1, num_groups * nq * 4)
    per_candidate_vectors = max(1, r_c * store.dim * 4)
    return max(256, min(BLOCK_SCORE_BYTES // per_candidate_scores, BLOCK_VECTOR_BYTES // per_candidate_vectors))


def _blockwise_search(store: Store, q, q_mask, groups, k: int, allowed, scanner: str):
    G, nq = len(groups), q.shape[0]
    r_c = max(g[1] for g in groups)
    best = empty_result(G, nq, k, q.device)
    block = _block_rows(store, nq, G, r_c)
    fused = False
    if scanner == "triton":
        from ..triton import index_launch

        fused = index_launch.supports(groups)
    if fused:
        score_block = lambda seg, r0, r1: index_launch.score_block(store, seg, q, q_mask, groups, r0, r1)  # noqa: E731
    else:
        impl = select_backend(scanner, q.device, q.dtype, groups)

        def score_block(seg, r0, r1):
            rows = torch.arange(r0, r1, device=q.device)
            vectors, mask = store.gather_vectors(seg, rows, r_c)
            return impl.maxsim_grouped(q, vectors.to(q.dtype), groups, q_mask, mask)

    base = 0
    for seg, allow in zip(store.segments, allowed):
        for r0 in range(0, seg.n, block):
            r1 = min(seg.n, r0 + block)
            scores = score_block(seg, r0, r1)  # (G, nq, B)
            ids = seg.ids[r0:r1]
            if allow is not None:
                ids = torch.where(allow[r0:r1], ids, torch.full_like(ids, NO_ID))
            rows = torch.arange(base + r0, base + r1, device=q.device)
            shape = (G, nq, r1 - r0)
            merged = order_topk(torch.cat([best[0], scores], -1), torch.cat([best[1], ids.expand(shape)], -1), k,
                                torch.cat([best[2], rows.expand(shape)], -1))
            best = merged
        base += seg.n
    return best


# ---- scoring given rows (the cascade's rerank) ------------------------------------------

def score_rows(store: Store, q: torch.Tensor, q_mask: Optional[torch.Tensor], groups, rows: torch.Tensor,
               scanner: str):
    """Scores (G, Nq, K) of query a against global rows rows[a, :] (-1: score -inf); q, q_mask
    as ``read_queries`` gave them for ``scanner``."""
    G, nq, K = len(groups), q.shape[0], rows.shape[1]
    if nq == 0 or K == 0 or store.num_rows == 0:
        return torch.full((G, nq, K), float("-inf"), dtype=torch.float32, device=q.device)
    r_c = max(g[1] for g in groups)
    if scanner == "cpu":
        data, scales, masks, _, _, seg_rows = _op_lists(store, r_c, [None] * len(store.segments))
        rq, rc = _split_groups(groups)
        return torch.ops.metaembed.index_score_rows(q, q_mask, data, scales, masks, seg_rows, store.bounds, rq, rc,
                                                    rows)
    impl = select_backend(scanner, q.device, q.dtype, groups)
    starts = torch.tensor([0] + [seg.n for seg in store.segments], device=q.device).cumsum(0)
    out = torch.full((G, nq, K), float("-inf"), dtype=torch.float32, device=q.device)
    for a in range(nq):
        valid = rows[a] >= 0
        if not bool(valid.any()):
            continue
        r = rows[a][valid]
        seg_of = torch.searchsorted(starts, r, right=True) - 1
        vectors, masks = [], []
        for s in seg_of.unique().tolist():
            sel = seg_of == s
            v, m = store.gather_vectors(store.segments[s], r[sel] - starts[s], r_c)
            vectors.append((sel.nonzero().squeeze(1), v, m))
        order = torch.cat([v[0] for v in vectors])
        vecs = torch.cat([v[1] for v in vectors])[torch.argsort(order)]
        mask = None
        if store.masked:
            mask = torch.cat([v[2] for v in vectors])[torch.argsort(order)]
        qm = None if q_mask is None else q_mask[a: a + 1]
        out[:, a, valid] = impl.maxsim_grouped(q[a: a + 1], vecs.to(q.dtype), groups, qm, mask)[:, 0]
    return out


def slabs_read(store: Store, r_c: int) -> int:
    return slabs_for(store.bounds, r_c)
