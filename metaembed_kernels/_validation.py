"""Argument checking shared by every public entry point.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, range or device) naming the argument and what was expected, before any
kernel sees the data. The C++/CUDA ops re-check the invariants they rely on for memory
safety, so a direct ``torch.ops.metaembed.*`` call cannot read out of bounds either.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Groups = Tuple[Tuple[int, int], ...]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {_shape(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 for the reference), got {t.dtype}"
        )


def check_embeddings(q, c, c_name: str = "c", c_layout: str = "(Nc, Rc, D)") -> None:
    """q is (Nq, Rq, D); c has the layout given, with the same D, dtype and device."""
    check_tensor("q", q, 3, "(Nq, Rq, D)")
    check_tensor(c_name, c, len(c_layout.split(",")), c_layout)
    if q.shape[-1] < 1:
        raise ValueError(f"q must have an embedding dim D >= 1, got shape {_shape(q)}")
    if q.shape[1] < 1 or c.shape[-2] < 1:
        raise ValueError(
            f"q and {c_name} need at least one token each: q has shape {_shape(q)}, "
            f"{c_name} has shape {_shape(c)}"
        )
    if c.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{c_name} must have the same embedding dim D as q: q has D={q.shape[-1]}, "
            f"{c_name} has shape {_shape(c)}"
        )
    if c.dtype != q.dtype:
        raise TypeError(f"{c_name} must have the dtype of q ({q.dtype}), got {c.dtype}")
    if c.device != q.device:
        raise ValueError(f"{c_name} must be on the device of q ({q.device}), got {c.device}")


def normalize_groups(groups, rq: int, rc: int) -> Groups:
    """Return groups as a tuple of (r_q, r_c) int pairs, checked against (Rq, Rc)."""
    if groups is None:
        return ((rq, rc),)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(
            f"groups must be a sequence of (r_q, r_c) pairs, got {type(groups).__name__}"
        )
    if len(groups) == 0:
        raise ValueError("groups must contain at least one (r_q, r_c) pair, got an empty sequence")
    out = []
    for k, pair in enumerate(groups):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"groups[{k}] must be an (r_q, r_c) pair of ints, got {pair!r}")
        r_q, r_c = pair
        for v in (r_q, r_c):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"groups[{k}] must be an (r_q, r_c) pair of ints, got {pair!r}")
        r_q, r_c = int(r_q), int(r_c)
        if not (1 <= r_q <= rq) or not (1 <= r_c <= rc):
            raise ValueError(
                f"groups[{k}] = ({r_q}, {r_c}) is out of range: need 1 <= r_q <= Rq={rq} "
                f"and 1 <= r_c <= Rc={rc}"
            )
        out.append((r_q, r_c))
    return tuple(out)


def check_mask(name: str, mask, shape: Tuple[int, ...], layout: str, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {layout}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor of shape {layout}, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        expected = "(" + ", ".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on device {device}, got {mask.device}")
    return mask


def check_labels(labels, nq: int, nc: int, device) -> torch.Tensor:
    if labels is None:
        return torch.arange(nq, device=device)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor of shape (Nq,) = ({nq},), got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor of shape (Nq,) = ({nq},), got dtype {labels.dtype}")
    if tuple(labels.shape) != (nq,):
        raise ValueError(f"labels must have shape (Nq,) = ({nq},), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"labels must be on device {device}, got {labels.device}")
    if nq > 0:
        if torch.compiler.is_compiling():
            # No data-dependent Python branch inside a graph: assert on the device instead.
            torch._assert_async(((labels >= 0) & (labels < nc)).all(), "labels out of range [0, Nc)")
        else:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= nc:
                raise ValueError(
                    f"labels must index the candidates c: need 0 <= labels < Nc={nc}, "
                    f"got values in [{lo}, {hi}]"
                )
    return labels


def check_weights(weights, num_groups: int):
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.shape != (num_groups,):
            raise ValueError(f"weights must have shape (G,) = ({num_groups},), got {_shape(weights)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        return weights
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of {num_groups} floats, got {type(weights).__name__}")
    if len(weights) != num_groups:
        raise ValueError(f"weights must have one entry per group (G={num_groups}), got {len(weights)}")
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{k}] must be a real number, got {w!r}")
    return tuple(float(w) for w in weights)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def check_reduction(reduction) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction
