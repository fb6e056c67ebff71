"""Argument checking: the one validator every entry point and every backend goes through.

Two layers, one module:

* **Public arguments** (``check_embeddings``, ``normalize_groups``, ``check_mask``,
  ``check_labels``, ...): what the functions in ``functional.py`` accept, with messages that
  name the argument and what was expected. They run before dispatch, on host-known
  properties only (shapes, dtypes, devices, Python values): never a device-to-host sync.
* **Op arguments** (``check_maxsim_op``, ``check_infonce_op``, ``check_label_values``):
  the invariants the kernels rely on for memory safety, checked by every op
  implementation written in Python (reference, triton) and by every fake kernel (with
  ``torch._check_value`` / ``torch._check_type``, so symbolic shapes become deferred
  asserts, not guards). The C++ ops check the same invariants with the same messages in
  csrc/common/checks.h; tests/test_validation.py runs every bad case through every
  backend's op so that the two cannot drift apart.

Errors: ``TypeError`` for the wrong kind of object or dtype, ``ValueError`` for the wrong
shape, range or device.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Groups = Tuple[Tuple[int, int], ...]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# =======================================================================================
# Public arguments
# =======================================================================================
def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {_shape(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 (float64 on the reference and cpu backends), "
            f"got {t.dtype}"
        )


def check_embeddings(q, c, c_name: str = "c", c_layout: str = "(Nc, Rc, D)", q_layout: str = "(Nq, Rq, D)") -> None:
    """q is (N, Rq, D); c has the layout given, with the same D, dtype and device."""
    check_tensor("q", q, 3, q_layout)
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


def check_paired_embeddings(q, c) -> None:
    """q (B, Rq, D) and c (B, N, Rc, D): each query row b against its own candidates c[b]."""
    check_embeddings(q, c, "c", "(B, N, Rc, D)", "(B, Rq, D)")
    if c.shape[0] != q.shape[0]:
        raise ValueError(
            f"c must have one row of candidates per query: q has B={q.shape[0]}, c has shape {_shape(c)}"
        )


def normalize_groups(groups, rq: Optional[int], rc: Optional[int]) -> Groups:
    """Return groups as a tuple of (r_q, r_c) int pairs, checked against (Rq, Rc) (only
    against >= 1 when Rq, Rc are None: groups given before the tensors)."""
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
        if rq is None and (r_q < 1 or r_c < 1):
            raise ValueError(f"groups[{k}] = ({r_q}, {r_c}) is out of range: need r_q >= 1 and r_c >= 1")
        if rq is not None and (not (1 <= r_q <= rq) or not (1 <= r_c <= rc)):
            raise ValueError(
                f"groups[{k}] = ({r_q}, {r_c}) is out of range: need 1 <= r_q <= Rq={rq} "
                f"and 1 <= r_c <= Rc={rc}"
            )
        out.append((r_q, r_c))
    return tuple(out)


def check_group_pairs(groups) -> Groups:
    """Groups given without the tensors (module constructors): (r_q, r_c) pairs of ints >= 1."""
    if groups is None:
        return None
    return normalize_groups(groups, None, None)


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
    """Shape, dtype and device of ``labels``; the default arange(Nq) needs Nq <= Nc.

    The values of given labels are checked inside each op (``check_label_values``): on the
    host for CPU tensors, with a device-side assert for GPU tensors (no sync).
    """
    if labels is None:
        if nq > nc:
            raise ValueError(
                f"labels: the default labels arange(Nq) index the candidates c, so they need "
                f"Nq <= Nc, got Nq={nq} queries and Nc={nc} candidates; pass labels explicitly"
            )
        return torch.arange(nq, device=device)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor of shape (Nq,) = ({nq},), got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor of shape (Nq,) = ({nq},), got dtype {labels.dtype}")
    if tuple(labels.shape) != (nq,):
        raise ValueError(f"labels must have shape (Nq,) = ({nq},), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"labels must be on device {device}, got {labels.device}")
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
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_reduction(reduction) -> str:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return reduction


# =======================================================================================
# Op arguments (every backend; mirrored in csrc/common/checks.h)
# =======================================================================================
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _op_operand(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    torch._check_value(t.dim() == ndim, lambda: f"{name} must have shape {layout}, got {_shape(t)}")
    torch._check_type(
        t.dtype in _OP_DTYPES, lambda: f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
    )


def _op_pair(q, c, c_name: str, c_ndim: int, c_layout: str) -> None:
    _op_operand("q", q, 3, "(Nq, Rq, D)")
    _op_operand(c_name, c, c_ndim, c_layout)
    torch._check_value(q.shape[2] >= 1, lambda: f"q must have D >= 1, got {_shape(q)}")
    torch._check_value(
        c.shape[-1] == q.shape[2],
        lambda: f"{c_name} must have the embedding dim D={q.shape[2]} of q, got {_shape(c)}",
    )
    torch._check_type(c.dtype == q.dtype, lambda: f"{c_name} must have the dtype of q ({q.dtype}), got {c.dtype}")
    torch._check_value(
        c.device == q.device, lambda: f"{c_name} must be on the device of q ({q.device}), got {c.device}"
    )


def _op_mask(name: str, mask: Optional[torch.Tensor], shape, like: torch.Tensor) -> None:
    if mask is None:
        return
    torch._check_type(mask.dtype == torch.bool, lambda: f"{name} must be a bool tensor, got {mask.dtype}")
    torch._check_value(
        mask.dim() == len(shape) and all(a == b for a, b in zip(mask.shape, shape)),
        lambda: f"{name} must have shape {tuple(shape)}, got {_shape(mask)}",
    )
    torch._check_value(
        mask.device == like.device, lambda: f"{name} must be on device {like.device}, got {mask.device}"
    )


def _op_groups(group_rq: Sequence[int], group_rc: Sequence[int], rq, rc) -> None:
    torch._check_value(
        len(group_rq) == len(group_rc),
        lambda: f"group_rq and group_rc must have the same length, got {len(group_rq)} and {len(group_rc)}",
    )
    torch._check_value(len(group_rq) > 0, lambda: "groups must contain at least one (r_q, r_c) pair")
    for g, (r_q, r_c) in enumerate(zip(group_rq, group_rc)):
        torch._check_value(
            1 <= r_q <= rq and 1 <= r_c <= rc,
            lambda: f"groups[{g}] = ({r_q}, {r_c}) is out of range: need 1 <= r_q <= Rq={rq} and "
            f"1 <= r_c <= Rc={rc}",
        )


def check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired: bool = False) -> None:
    """Arguments of maxsim_grouped / maxsim_paired_grouped (and their backward)."""
    if paired:
        _op_pair(q, c, "c", 4, "(B, N, Rc, D)")
        torch._check_value(
            c.shape[0] == q.shape[0], lambda: f"c must have shape (B, N, Rc, D) with B={q.shape[0]}, got {_shape(c)}"
        )
    else:
        _op_pair(q, c, "c", 3, "(Nc, Rc, D)")
    _op_mask("q_mask", q_mask, q.shape[:2], q)
    _op_mask("c_mask", c_mask, c.shape[:-1], q)
    _op_groups(group_rq, group_rc, q.shape[1], c.shape[-2])


def check_scores_grad(grad, q, c, num_groups: int, paired: bool = False) -> None:
    expected = (num_groups, q.shape[0], c.shape[1] if paired else c.shape[0])
    torch._check_value(
        grad.dim() == 3 and all(a == b for a, b in zip(grad.shape, expected)),
        lambda: f"grad must have shape (G, {'B, N' if paired else 'Nq, Nc'}) = {expected}, got {_shape(grad)}",
    )


def check_infonce_op(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask) -> None:
    """Arguments of matryoshka_infonce (and its backward); label values: check_label_values."""
    _op_pair(q, c, "c", 3, "(Nc, Rc, D)")
    _op_pair(q, hard_negatives, "hard_negatives", 4, "(Nq, K, Rc, D)")
    torch._check_value(
        hard_negatives.shape[0] == q.shape[0] and hard_negatives.shape[2] == c.shape[1],
        lambda: f"hard_negatives must have shape (Nq, K, Rc, D) = ({q.shape[0]}, K, {c.shape[1]}, {q.shape[2]}), "
        f"got {_shape(hard_negatives)}",
    )
    torch._check_value(
        scale > 0 and math.isfinite(scale), lambda: f"scale must be finite and > 0 (1 / temperature), got {scale}"
    )
    _op_mask("q_mask", q_mask, q.shape[:2], q)
    _op_mask("c_mask", c_mask, c.shape[:2], q)
    _op_mask("hard_negatives_mask", hn_mask, hard_negatives.shape[:3], q)
    torch._check_type(labels.dtype == torch.int64, lambda: f"labels must be int64, got {labels.dtype}")
    torch._check_value(
        labels.dim() == 1 and labels.shape[0] == q.shape[0],
        lambda: f"labels must have shape (Nq,) = ({q.shape[0]},), got {_shape(labels)}",
    )
    torch._check_value(
        labels.device == q.device, lambda: f"labels must be on device {q.device}, got {labels.device}"
    )
    _op_groups(group_rq, group_rc, q.shape[1], c.shape[1])


def check_infonce_grad(grad, lse, num_groups: int, nq) -> None:
    for name, t in (("grad", grad), ("lse", lse)):
        torch._check_value(
            t.dim() == 2 and t.shape[0] == num_groups and t.shape[1] == nq,
            lambda: f"{name} must have shape (G, Nq) = ({num_groups}, {nq}), got {_shape(t)}",
        )


def check_label_values(labels: torch.Tensor, nc: int) -> None:
    """0 <= labels < Nc, at run time inside an op, without a host-device sync.

    ``torch._assert_async`` checks on the device: for CPU tensors it fails at once (re-raised
    here as ValueError naming labels); for accelerator tensors it enqueues a device-side
    assert that fires at the next synchronisation, so the step stays capturable in a CUDA
    graph. Kernels compare labels with candidate indices and never use them as addresses.
    """
    if labels.numel() == 0:
        return
    in_range = ((labels >= 0) & (labels < nc)).all()
    message = f"labels must index the candidates c: need 0 <= labels < Nc={nc}"
    if labels.device.type != "cpu":
        torch._assert_async(in_range, message)
        return
    try:
        torch._assert_async(in_range, message)
    except RuntimeError:
        lo, hi = int(labels.min()), int(labels.max())  # the error path may read values
        raise ValueError(f"{message}, got values in [{lo}, {hi}]") from None
