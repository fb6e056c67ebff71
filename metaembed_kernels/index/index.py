"""MultiVectorIndex: the public class (argument checks and orchestration).

    index = MultiVectorIndex(dim, num_vectors, dtype="bfloat16", device="cpu")
    ids = index.add(c, ids=None, c_mask=None, progress=False)
    index.remove(ids)
    scores, ids = index.search(q, k, budget=None, q_mask=None, shortlist=None, filter_ids=None)
    scores, ids = index.search_grouped(q, k, groups)
    index.save(path);  index = MultiVectorIndex.load(path, mmap=True, verify=True)

Scores are ``maxsim_grouped`` scores, masks included, of the queries converted to the
index's compute dtype (bfloat16 for a bfloat16 index, float32 for float32 and int8) against
the stored vectors (dequantised for int8):

    s(a, b) = sum_{i < r_q, q valid}  max_{j < r_c, c valid}  <q[a, i], c[b, j]>

where a query vector facing no valid candidate vector in the prefix contributes 0.
"""
from __future__ import annotations

import numbers
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import _validation as V
from . import persistence
from . import search as S
from .int8_rounding import rounding_factor, second_moment
from .storage import (INDEX_DTYPES, Store, bytes_per_candidate)

_ADD_CHUNK_BYTES = 64 << 20  # float32 bytes converted at a time by `add`


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_dtype(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in INDEX_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {tuple(INDEX_DTYPES)}, got {dtype}")
        return names[dtype]
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be one of {tuple(INDEX_DTYPES)} (a str), got {type(dtype).__name__}")
    if dtype not in INDEX_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(INDEX_DTYPES)}, got {dtype!r}")
    return dtype


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r} ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available")
    return device


def _as_id_tensor(name: str, ids, device) -> torch.Tensor:
    """ids as a 1-D int64 tensor on `device` (from a tensor, numpy array or sequence of ints)."""
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise TypeError(f"{name} must be a 1-D int64 tensor or a sequence of ints, got {type(ids).__name__}")
        try:
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D int64 tensor or a sequence of ints ({err})") from None
        if t.numel() == 0:
            t = t.to(torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers (int64), got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def _first(t: torch.Tensor, n: int = 5) -> str:
    values = t[:n].tolist()
    return ", ".join(str(v) for v in values) + (", ..." if t.numel() > n else "")


class MultiVectorIndex:
    """A budgeted retrieval index of multi-vector candidates (see the module docstring of
    ``metaembed_kernels.index``)."""

    def __init__(self, dim: int, num_vectors: int, *, dtype: str = "bfloat16", device="cpu"):
        self._store = Store(_check_positive_int("dim", dim), _check_positive_int("num_vectors", num_vectors),
                            _check_dtype(dtype), _check_device(device))

    @classmethod
    def _from_store(cls, store: Store) -> "MultiVectorIndex":
        index = cls.__new__(cls)
        index._store = store
        return index

    # ---- properties ---------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._store.dim

    @property
    def num_vectors(self) -> int:
        return self._store.num_vectors

    @property
    def dtype(self) -> str:
        return self._store.dtype

    @property
    def device(self) -> torch.device:
        return self._store.device

    @property
    def nbytes(self) -> int:
        """Bytes of stored data: vectors (+ int8 scales, + masks if any), ids and tombstones of
        every stored row (removed rows stay stored until the index is rebuilt)."""
        return self._store.nbytes

    def __len__(self) -> int:
        """Number of live (not removed) candidates."""
        return self._store.num_live

    def ids(self) -> torch.Tensor:
        """ids of the live candidates, in storage order."""
        return self._store.live_ids()

    def __repr__(self) -> str:
        return (f"MultiVectorIndex(dim={self.dim}, num_vectors={self.num_vectors}, dtype={self.dtype!r}, "
                f"device={str(self.device)!r}, live={len(self)}, nbytes={self.nbytes})")

    @staticmethod
    def estimate_bytes(n: int, num_vectors: int, dim: int, dtype: str = "bfloat16") -> int:
        """``nbytes`` of an index of n candidates (without masks), before building it."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an int, got {n!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return int(n) * bytes_per_candidate(_check_positive_int("num_vectors", num_vectors),
                                            _check_positive_int("dim", dim), _check_dtype(dtype))

    # ---- add / remove -------------------------------------------------------------------
    def _check_batch(self, c, ids, c_mask, where: str):
        st = self._store
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"c{where} must be a torch.Tensor of shape (N, Rc, D), got {type(c).__name__}")
        if c.dim() != 3:
            raise ValueError(f"c{where} must have shape (N, Rc, D) = (N, {st.num_vectors}, {st.dim}), got "
                             f"{tuple(c.shape)}")
        if not c.is_floating_point():
            raise TypeError(f"c{where} must be float32, float16, bfloat16 or float64, got {c.dtype}")
        if c.shape[2] != st.dim:
            raise ValueError(f"c{where} has D={c.shape[2]}, but the index has dim={st.dim}")
        if c.shape[1] != st.num_vectors:
            raise ValueError(f"c{where} has Rc={c.shape[1]} vectors per candidate, but the index has "
                             f"num_vectors={st.num_vectors}")
        n = c.shape[0]
        if ids is not None:
            ids = _as_id_tensor(f"ids{where}", ids, st.device)
            if ids.shape[0] != n:
                raise ValueError(f"ids{where} must have one id per candidate ({n}), got {ids.shape[0]}")
        mask = V.check_mask(f"c_mask{where}", c_mask, (n, st.num_vectors), "(N, Rc)", c.device)
        return ids, mask

    def add(self, c, *, ids=None, c_mask=None, progress: bool = False) -> torch.Tensor:
        """Add candidates and return their int64 ids.

        Args:
            c: (N, Rc, D) float tensor, or an iterable of such batches (streamed: each batch
                is converted and stored before the next one is drawn).
            ids: optional int64 ids >= 0, unique among the live candidates: (N,) for a tensor,
                an iterable of per-batch ids for an iterable. Default: consecutive ids after
                the largest one ever given.
            c_mask: optional (N, Rc) bool (True = valid vector), per batch for an iterable.
            progress: show a tqdm progress bar over the batches.

        NaN or infinite values are rejected (they would poison int8 scales). A rejected add
        changes nothing: rows of earlier batches of the same call are rolled back.
        """
        st = self._store
        if isinstance(c, torch.Tensor):
            batches: Iterable = [(c, ids, c_mask)]
            total = 1
        else:
            if isinstance(c, (str, bytes)) or not hasattr(c, "__iter__"):
                raise TypeError(f"c must be a (N, Rc, D) tensor or an iterable of them, got {type(c).__name__}")
            for name, value in (("ids", ids), ("c_mask", c_mask)):
                if isinstance(value, torch.Tensor):
                    raise TypeError(f"{name} must be an iterable of per-batch values when c is an iterable of "
                                    "batches, got one tensor")
            total = len(c) if hasattr(c, "__len__") else None
            batches = _zip_batches(c, ids, c_mask)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, desc="MultiVectorIndex.add", unit="batch")

        sizes = [seg.n for seg in st.segments]
        next_id, was_masked = st.next_id, st.masked
        existing = st.live_ids()
        added: List[torch.Tensor] = []
        try:
            for number, (batch, batch_ids, batch_mask) in enumerate(batches):
                where = "" if isinstance(c, torch.Tensor) else f" (batch {number})"
                added.append(self._add_batch(batch, batch_ids, batch_mask, where, existing, added))
        except BaseException:
            st.truncate(sizes)
            st.next_id = next_id
            if not was_masked and st.masked:
                for seg in st.segments:
                    seg.masks = None
                st.masked = False
            raise
        finally:
            if progress:
                batches.close()
        if not added:
            return torch.empty(0, dtype=torch.int64, device=st.device)
        return torch.cat(added)

    def _add_batch(self, c, ids, c_mask, where, existing, added) -> torch.Tensor:
        st = self._store
        ids, c_mask = self._check_batch(c, ids, c_mask, where)
        n = c.shape[0]
        if c.device != st.device:
            c = c.to(st.device)
        if c_mask is not None and c_mask.device != st.device:
            c_mask = c_mask.to(st.device)
        if ids is None:
            ids = torch.arange(st.next_id, st.next_id + n, dtype=torch.int64, device=st.device)
        elif n > 0:
            if int(ids.min()) < 0:
                raise ValueError(f"ids{where} must be >= 0 (-1 marks empty result slots), got {int(ids.min())}")
            unique = torch.unique(ids)
            if unique.numel() != n:
                sorted_ids = torch.sort(ids).values
                dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]].unique()
                raise ValueError(f"ids{where} contains duplicate ids: {_first(dup)}")
            taken = torch.isin(ids, existing)
            for previous in added:
                taken |= torch.isin(ids, previous)
            if bool(taken.any()):
                raise ValueError(f"ids{where} are already in the index: {_first(ids[taken])}")
        if n == 0:
            return ids
        # Conversion (and int8 quantisation) happens in chunks of rows: the float32 copy of a
        # huge batch never exists at once. Every chunk is checked before any is stored.
        chunk = max(1, _ADD_CHUNK_BYTES // (4 * st.num_vectors * st.dim))
        for r0 in range(0, n, chunk):
            part = c[r0: r0 + chunk]
            if not bool(torch.isfinite(part).all()):
                bad = (~torch.isfinite(part)).flatten(1).any(1).nonzero().squeeze(1) + r0
                raise ValueError(f"c{where} holds NaN or infinite values (candidates {_first(bad)}): they would "
                                 "poison the index (int8 scales, every score)")
            if st.dtype == "bfloat16" and not bool(torch.isfinite(part.to(torch.bfloat16)).all()):
                raise ValueError(f"c{where} holds values beyond the bfloat16 range (they round to inf)")
        if c_mask is not None and not bool(c_mask.all()):
            st.enable_masks()
        rounding = None
        if st.dtype == "int8":  # score-aware codes: the error kept out of this batch's shared directions
            moment, count = torch.zeros(st.dim, st.dim, dtype=torch.float64, device=st.device), 0
            for r0 in range(0, n, chunk):
                m, k = second_moment(c[r0: r0 + chunk], None if c_mask is None else c_mask[r0: r0 + chunk])
                moment, count = moment + m, count + k
            rounding = rounding_factor(moment, count)
        seg = st.reserve(n)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            st.write(seg, c[r0:r1], ids[r0:r1], None if c_mask is None else c_mask[r0:r1], rounding)
        st.next_id = max(st.next_id, int(ids.max()) + 1)
        return ids

    def remove(self, ids) -> None:
        """Tombstone candidates by id: searches never return them again. Every id must be live
        (an unknown or already removed id raises ValueError and nothing is removed)."""
        st = self._store
        ids = _as_id_tensor("ids", ids, st.device)
        if ids.numel() == 0:
            return
        unique = torch.unique(ids)
        if unique.numel() != ids.numel():
            raise ValueError("ids contains duplicate ids")
        hits = [torch.isin(seg.ids_view(), unique) & seg.live_view() for seg in st.segments]
        found = sum(int(h.sum()) for h in hits)
        if found != unique.numel():
            missing = unique[~torch.isin(unique, st.live_ids())]
            raise ValueError(f"ids: cannot remove ids that are not in the index (or already removed): "
                             f"{_first(missing)}")
        for seg, h in zip(st.segments, hits):
            count = int(h.sum())
            if count:
                seg.live[: seg.n][h] = False
                seg.num_removed += count

    # ---- search -------------------------------------------------------------------------
    def _check_queries(self, q, q_mask):
        st = self._store
        V.check_tensor("q", q, 3, "(Nq, Rq, D)")
        if q.shape[2] != st.dim:
            raise ValueError(f"q has D={q.shape[2]}, but the index has dim={st.dim}")
        if q.shape[1] < 1:
            raise ValueError(f"q needs at least one vector per query, got shape {tuple(q.shape)}")
        if q.device != st.device:
            raise ValueError(f"q must be on the index's device ({st.device}), got {q.device}")
        q_mask = V.check_mask("q_mask", q_mask, q.shape[:2], "(Nq, Rq)", q.device)
        return q, q_mask

    def _check_budget(self, name: str, budget, rq: int) -> Tuple[int, int]:
        rc = self._store.num_vectors
        if budget is None:
            return (rq, rc)
        if type(budget) is tuple and len(budget) == 2 and type(budget[0]) is int and type(budget[1]) is int:
            if 1 <= budget[0] <= rq and 1 <= budget[1] <= rc:  # the common case, without the abc checks below
                return budget
        if isinstance(budget, (str, bytes)) or not isinstance(budget, Sequence) or len(budget) != 2 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in budget):
            raise TypeError(f"{name} must be an (r_q, r_c) pair of ints, got {budget!r}")
        r_q, r_c = int(budget[0]), int(budget[1])
        if not (1 <= r_c <= rc) or not (1 <= r_q <= rq):
            raise ValueError(f"{name} = ({r_q}, {r_c}) is outside the stored range: need 1 <= r_q <= Rq={rq} "
                             f"(the queries' vectors) and 1 <= r_c <= num_vectors={rc}")
        return (r_q, r_c)

    @staticmethod
    def _check_k(name: str, k) -> int:
        if type(k) is int and k > 0:  # the common case, without the abc check below
            return k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"{name} must be a positive int, got {k!r}")
        if k <= 0:
            raise ValueError(f"{name} must be >= 1, got {k}")
        return int(k)

    def _allowed(self, filter_ids) -> List[Optional[torch.Tensor]]:
        st = self._store
        if filter_ids is None:
            return [seg.live_view() if seg.num_removed else None for seg in st.segments]
        wanted = torch.unique(_as_id_tensor("filter_ids", filter_ids, st.device))
        return [seg.live_view() & torch.isin(seg.ids_view(), wanted) for seg in st.segments]

    def search(self, q: torch.Tensor, k: int, *, budget: Optional[Tuple[int, int]] = None,
               q_mask: Optional[torch.Tensor] = None, shortlist=None, filter_ids=None, process_group=None):
        """Exact top-k at one budget.

        Args:
            q: (Nq, Rq, D) float queries, on the index's device.
            k: results per query; fewer live candidates leave id -1, score -inf slots.
            budget: (r_q, r_c), default (Rq, num_vectors).
            q_mask: optional (Nq, Rq) bool, True = valid query vector.
            shortlist: ((r_q1, r_c1), k1): exact top-k1 at the small budget, then the k1
                candidates are rescored at ``budget`` and the best k returned (k1 >= k).
            filter_ids: optional ids: only these (live) candidates can be returned; ids not
                in the index are ignored.
            process_group: a torch.distributed group whose ranks hold shards with global ids:
                returns the top-k over every shard, on every rank.

        Returns:
            scores float32 (Nq, k), ids int64 (Nq, k): score descending, ties by id ascending.
        """
        k = self._check_k("k", k)
        q, q_mask = self._check_queries(q, q_mask)
        budget = self._check_budget("budget", budget, q.shape[1])
        if process_group is not None:
            from .distributed import check_group

            check_group(process_group)
        allowed = self._allowed(filter_ids)
        st = self._store
        if shortlist is None:
            scanner = S.scanner_for(st, (budget,))
            q, q_mask = S.read_queries(st, q, q_mask, budget[0], scanner)
            scores, ids, _ = S.search(st, q, q_mask, (budget,), k, allowed, scanner)
        else:
            if isinstance(shortlist, (str, bytes)) or not isinstance(shortlist, Sequence) or len(shortlist) != 2:
                raise TypeError(f"shortlist must be ((r_q1, r_c1), k1), got {shortlist!r}")
            small = self._check_budget("shortlist budget", shortlist[0], q.shape[1])
            k1 = self._check_k("shortlist k1", shortlist[1])
            if k1 < k:
                raise ValueError(f"shortlist k1 must be >= k (the rerank returns k of the k1), got k1={k1}, k={k}")
            scanner = S.scanner_for(st, (small, budget))
            q, q_mask = S.read_queries(st, q, q_mask, max(budget[0], small[0]), scanner)
            _, first_ids, rows = S.search(st, q, q_mask, (small,), k1, allowed, scanner)
            rescored = S.score_rows(st, q, q_mask, (budget,), rows[0], scanner)
            scores, ids = S.order_topk(rescored, first_ids, k)
        if process_group is not None:
            from .distributed import merge_across_ranks

            scores, ids = merge_across_ranks(scores, ids, k, process_group)
        return scores[0], ids[0]

    def search_grouped(self, q: torch.Tensor, k: int, groups, *, q_mask: Optional[torch.Tensor] = None,
                       filter_ids=None, process_group=None):
        """Exact top-k at every budget in ``groups`` from one pass over the data:
        scores float32 (G, Nq, k), ids int64 (G, Nq, k), in the order of ``groups``."""
        k = self._check_k("k", k)
        q, q_mask = self._check_queries(q, q_mask)
        groups = V.normalize_groups(groups, q.shape[1], self._store.num_vectors)
        if process_group is not None:
            from .distributed import check_group

            check_group(process_group)
        scanner = S.scanner_for(self._store, groups)
        q, q_mask = S.read_queries(self._store, q, q_mask, max(g[0] for g in groups), scanner)
        scores, ids, _ = S.search(self._store, q, q_mask, groups, k, self._allowed(filter_ids), scanner)
        if process_group is not None:
            from .distributed import merge_across_ranks

            scores, ids = merge_across_ranks(scores, ids, k, process_group)
        return scores, ids

    # ---- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index to directory ``path`` atomically (persistence.py)."""
        persistence.save(self._store, path)

    @classmethod
    def load(cls, path, *, mmap: bool = True, verify: bool = True, device="cpu") -> "MultiVectorIndex":
        """Open a saved index. ``mmap``: map the vectors instead of reading them (CPU only);
        ``verify``: check every file's sha256 (raises IndexCorruptedError naming the file)."""
        return cls._from_store(persistence.load(path, mmap=bool(mmap), verify=bool(verify),
                                                device=_check_device(device)))


def _zip_batches(c, ids, c_mask):
    ids_iter = iter(ids) if ids is not None else None
    mask_iter = iter(c_mask) if c_mask is not None else None
    for number, batch in enumerate(c):
        values = []
        for name, it in (("ids", ids_iter), ("c_mask", mask_iter)):
            try:
                values.append(next(it) if it is not None else None)
            except StopIteration:
                raise ValueError(f"{name} has fewer batches than c (none for batch {number})") from None
        yield batch, values[0], values[1]
