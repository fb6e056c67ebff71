"""Storage of a MultiVectorIndex: prefix slabs, int8 quantisation, segments, ids and tombstones.

Prefix slabs
------------
Candidate b has ``num_vectors`` (Rc) vectors of ``dim`` (D) numbers. A budget (r_q, r_c)
reads only the first r_c of them, so the vectors are not stored candidate-major: they are
cut at the slab bounds

    bounds = [0, 1, 2, 4, 8, ..., 2^m, Rc]        (every power of two below Rc, then Rc)

and slab s holds vectors [bounds[s], bounds[s+1]) of every candidate, as one row-major
array of shape (N, w_s, D), w_s = bounds[s+1] - bounds[s]. A budget with r_c reads slabs
0 .. s(r_c) and, of the last one, only the first r_c - bounds[s] vectors of each row:
with Rc = 64 the MetaEmbed budgets r_c = 1, 4, 8, 16, 64 read exactly r_c·D numbers per
candidate and nothing of vectors r_c .. Rc-1. Token j of candidate b lives at

    slab[s(j)][b, j - bounds[s(j)], :],     s(j) = the slab with bounds[s] <= j < bounds[s+1].

Byte layout of one slab (little-endian, C order, no header; the files of a saved index
hold exactly these bytes, see persistence.py):

    float32   data:   N * w_s * D * 4 bytes, IEEE binary32
    bfloat16  data:   N * w_s * D * 2 bytes, the upper 16 bits of the binary32 value
                      (round to nearest even from float32)
    int8      data:   N * w_s * D bytes, two's complement, values in [-127, 127]
              scales: N * w_s * 8 bytes, binary32 pairs, one pair per vector, in a
                      parallel array (N, w_s, 2): scales[b, t, 0] is the scale of
                      data[b, t, :], scales[b, t, 1] the L2 norm of its dequantised
                      vector (rounded up; the int8 scan's error bound uses it)
    mask (optional, any dtype): N * w_s bytes, 1 = valid vector, 0 = masked

int8 is per-vector symmetric quantisation: for a vector v (computed in float32),

    scale = max_d |v_d| / 127,    x_d in [-127, 127] an integer near v_d / scale

(scale 0 and x = 0 for a zero vector), and the index scores the *dequantised* vector

    v'_d = float32(x_d) * scale        (one float32 multiply)

exactly as ``maxsim_grouped(q, v')`` would. ``add`` chooses the integers by score-aware
rounding (int8_rounding.py: error feedback that keeps the error out of the directions the
added vectors share; |v_d - v'_d| is then within a few steps, 1.9 scale at most on the index
benchmark's vectors, instead of <= scale / 2);
``quantize_int8`` without a rounding factor rounds half to even. -128 is never produced, so
|x_d| <= 127 and x_d can be negated or multiplied by 127-bounded integers without overflow
(the int8 kernels rely on this).

Segments
--------
The rows of an index are held in one or more segments, each with its own slabs, ids and
tombstones; search scans every segment in one pass. ``add`` fills the last segment and, when
it is full, opens a new one (of at least half the rows held so far), so building never
copies the data already stored, and a segment memory-mapped from disk (read-only) is never
written: rows added after ``load`` go to a new segment. Row r of segment s has the global
row number (rows of segments before s) + r.

ids are int64 >= 0, unique among live candidates; ``live`` is the tombstone array (False =
removed: never returned, never scored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .int8_rounding import INT8_MAX, feedback_round

INDEX_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
MIN_SEGMENT_ROWS = 4096


def slab_bounds(num_vectors: int) -> List[int]:
    """[0, 1, 2, 4, ..., 2^m, num_vectors]: slab s holds vectors [bounds[s], bounds[s+1])."""
    bounds, p = [0], 1
    while p < num_vectors:
        bounds.append(p)
        p *= 2
    bounds.append(num_vectors)
    return bounds


def slabs_for(bounds: Sequence[int], r_c: int) -> int:
    """Number of slabs a budget with r_c vectors reads (the first ones)."""
    return next(s for s in range(len(bounds) - 1) if bounds[s + 1] >= r_c) + 1


def compute_dtype(dtype: str) -> torch.dtype:
    """The dtype queries are converted to: the stored dtype, float32 for int8."""
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def quantize_int8(v: torch.Tensor, rounding: Optional[torch.Tensor] = None):
    """Per-vector symmetric int8 of v (..., D): (x int8 (..., D), scales float32 (..., 2)),
    scales[..., 0] the scale, scales[..., 1] the L2 norm of the dequantised vector, computed in
    float64 and rounded up to float32. `rounding`: None rounds to nearest; a factor from
    int8_rounding.rounding_factor chooses score-aware codes at the same scales."""
    v = v.to(torch.float32)
    scale = v.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = v / safe.unsqueeze(-1)
    if rounding is None:
        x = torch.round(w).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        x = feedback_round(w.reshape(-1, v.shape[-1]), rounding).reshape(v.shape).to(torch.int8)
    norm64 = dequantize_int8(x, scale).double().norm(dim=-1)
    norm = norm64.float()
    norm = torch.where(norm.double() < norm64, torch.nextafter(norm, torch.full_like(norm, float("inf"))), norm)
    return x, torch.stack([scale, norm], dim=-1)


def dequantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., D) int8 times its scale (...) (or the (..., 2) scale/norm pairs), in float32."""
    if scale.dim() == x.dim():
        scale = scale[..., 0]
    return x.to(torch.float32) * scale.unsqueeze(-1)


def bytes_per_candidate(num_vectors: int, dim: int, dtype: str, masked: bool = False) -> int:
    """Stored bytes per candidate: vectors, int8 scales, id (8), tombstone (1), mask."""
    n = num_vectors * dim * ELEMENT_BYTES[dtype] + 8 + 1
    if dtype == "int8":
        n += 8 * num_vectors
    if masked:
        n += num_vectors
    return n


def budget_bytes_per_candidate(r_c: int, dim: int, dtype: str) -> int:
    """Bytes of vector data a budget with r_c reads per candidate (scales included)."""
    return r_c * (dim * ELEMENT_BYTES[dtype] + (8 if dtype == "int8" else 0))


@dataclass
class Segment:
    """Rows [0, n) of capacity-sized arrays. ``data[s]`` (cap, w_s, D); ``scales[s]`` (cap, w_s, 2)
    float32 (scale, norm) for int8; ``masks[s]`` (cap, w_s) bool or None; ``ids`` (cap,) int64; ``live``
    (cap,) bool. ``writable`` is False for memory-mapped segments."""

    data: List[torch.Tensor]
    scales: Optional[List[torch.Tensor]]
    masks: Optional[List[torch.Tensor]]
    ids: torch.Tensor
    live: torch.Tensor
    n: int = 0
    writable: bool = True
    num_removed: int = 0

    @property
    def capacity(self) -> int:
        return self.ids.shape[0]

    def rows(self, array: torch.Tensor) -> torch.Tensor:
        """Rows [0, n) of one of the segment's arrays: the array itself when it holds no spare
        capacity (a slice costs microseconds a small search notices)."""
        return array if array.shape[0] == self.n else array[: self.n]

    def view(self, arrays):
        return None if arrays is None else [self.rows(a) for a in arrays]

    def live_view(self) -> torch.Tensor:
        return self.rows(self.live)

    def ids_view(self) -> torch.Tensor:
        return self.rows(self.ids)


@dataclass
class Store:
    dim: int
    num_vectors: int
    dtype: str
    device: torch.device
    bounds: List[int] = field(init=False)
    segments: List[Segment] = field(default_factory=list)
    masked: bool = False  # some stored vector is masked: every segment holds masks
    next_id: int = 0  # ids given by `add` without ids start here

    def __post_init__(self):
        self.bounds = slab_bounds(self.num_vectors)

    # ---- sizes --------------------------------------------------------------------------
    @property
    def widths(self) -> List[int]:
        return [self.bounds[s + 1] - self.bounds[s] for s in range(len(self.bounds) - 1)]

    @property
    def num_rows(self) -> int:
        return sum(seg.n for seg in self.segments)

    @property
    def num_live(self) -> int:
        return sum(seg.n - seg.num_removed for seg in self.segments)

    @property
    def nbytes(self) -> int:
        return self.num_rows * bytes_per_candidate(self.num_vectors, self.dim, self.dtype, self.masked)

    # ---- allocation ---------------------------------------------------------------------
    def _new_segment(self, capacity: int) -> Segment:
        dev, D = self.device, self.dim
        data = [torch.empty((capacity, w, D), dtype=INDEX_DTYPES[self.dtype], device=dev) for w in self.widths]
        scales = None
        if self.dtype == "int8":
            scales = [torch.empty((capacity, w, 2), dtype=torch.float32, device=dev) for w in self.widths]
        masks = [torch.ones((capacity, w), dtype=torch.bool, device=dev) for w in self.widths] if self.masked else None
        ids = torch.empty(capacity, dtype=torch.int64, device=dev)
        live = torch.zeros(capacity, dtype=torch.bool, device=dev)
        return Segment(data, scales, masks, ids, live)

    def enable_masks(self) -> None:
        """From now on every segment stores masks; rows stored so far are all valid."""
        if self.masked:
            return
        for seg in self.segments:
            seg.masks = [torch.ones((seg.capacity, w), dtype=torch.bool, device=self.device) for w in self.widths]
        self.masked = True

    def reserve(self, rows: int) -> Segment:
        """A writable segment with room for `rows` more rows (the last one, or a new one)."""
        if self.segments:
            last = self.segments[-1]
            if last.writable and last.capacity - last.n >= rows:
                return last
        capacity = max(rows, self.num_rows // 2, MIN_SEGMENT_ROWS)
        seg = self._new_segment(capacity)
        self.segments.append(seg)
        return seg

    # ---- writing rows -------------------------------------------------------------------
    def write(self, seg: Segment, vectors: torch.Tensor, ids: torch.Tensor, mask: Optional[torch.Tensor],
              rounding: Optional[torch.Tensor] = None) -> None:
        """Append rows: vectors (n, Rc, D) already finite, on the device; ids (n,) int64;
        rounding: int8 only, quantize_int8's."""
        n0, n = seg.n, vectors.shape[0]
        rows = slice(n0, n0 + n)
        if self.dtype == "int8":
            x, scale = quantize_int8(vectors, rounding)
        else:
            x, scale = vectors.to(INDEX_DTYPES[self.dtype]), None
        for s, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            seg.data[s][rows].copy_(x[:, lo:hi])
            if scale is not None:
                seg.scales[s][rows].copy_(scale[:, lo:hi])
            if seg.masks is not None:
                if mask is None:
                    seg.masks[s][rows].fill_(True)
                else:
                    seg.masks[s][rows].copy_(mask[:, lo:hi])
        seg.ids[rows].copy_(ids)
        seg.live[rows].fill_(True)
        seg.n = n0 + n

    def truncate(self, sizes: List[int]) -> None:
        """Roll back to the segment sizes recorded before a failed add."""
        del self.segments[len(sizes):]
        for seg, n in zip(self.segments, sizes):
            seg.live[n: seg.n].fill_(False)
            seg.n = n

    # ---- reading ------------------------------------------------------------------------
    def all_ids(self) -> torch.Tensor:
        """ids of every stored row (removed ones included), in global row order."""
        if not self.segments:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat([seg.ids_view() for seg in self.segments])

    def all_live(self) -> torch.Tensor:
        if not self.segments:
            return torch.empty(0, dtype=torch.bool, device=self.device)
        return torch.cat([seg.live_view() for seg in self.segments])

    def live_ids(self) -> torch.Tensor:
        ids = self.all_ids()
        return ids[self.all_live()]

    def gather_vectors(self, seg: Segment, rows: torch.Tensor, r_c: int):
        """Vectors [0, r_c) of the given rows of a segment, dequantised to the compute dtype:
        (len(rows), r_c, D), and their mask (or None)."""
        parts, masks = [], []
        for s in range(slabs_for(self.bounds, r_c)):
            take = min(self.bounds[s + 1], r_c) - self.bounds[s]
            x = seg.data[s][rows, :take]
            if self.dtype == "int8":
                x = dequantize_int8(x, seg.scales[s][rows, :take])
            parts.append(x)
            if seg.masks is not None:
                masks.append(seg.masks[s][rows, :take])
        vectors = torch.cat(parts, dim=1)
        return vectors, (torch.cat(masks, dim=1) if masks else None)

    def slab_views(self, seg: Segment, r_c: int):
        """(data, scales, masks) lists of the slabs a budget with r_c reads, rows [0, n)."""
        count = slabs_for(self.bounds, r_c)
        data = seg.view(seg.data[:count])
        scales = None if seg.scales is None else seg.view(seg.scales[:count])
        masks = None if seg.masks is None else seg.view(seg.masks[:count])
        return data, scales, masks
