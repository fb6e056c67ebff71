"""Pieces shared by the host adapters: input conversion, padding and the kernel entry points."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import functional as F

Budget = Optional[Tuple[int, int]]


def to_tensor(x) -> torch.Tensor:
    """A tensor from a tensor, an ndarray or a (nested) list of them (as the hosts accept)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            return torch.tensor([], dtype=torch.float32)
        if isinstance(x[0], torch.Tensor):
            return torch.stack(list(x))
        if isinstance(x[0], np.ndarray):
            return torch.from_numpy(np.array(x, dtype=np.float32))
        return torch.tensor(x, dtype=torch.float32)
    raise TypeError(f"expected a tensor, an ndarray or a list of them, got {type(x).__name__}")


def pad_ragged(items: Sequence, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a list of (L_i, D) embeddings to (B, max L_i, D); also return lengths (B,)."""
    tensors = [to_tensor(t) for t in items]
    if dtype is not None:
        tensors = [t.to(dtype) for t in tensors]
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0)
    return padded, lengths


def length_mask(lengths: torch.Tensor, width: int, device) -> torch.Tensor:
    """(B, width) bool, True for positions < lengths[b]."""
    return torch.arange(width, device=device)[None, :] < lengths.to(device)[:, None]


def groups_of(budget: Budget) -> Optional[List[Tuple[int, int]]]:
    if budget is None:
        return None
    if (not isinstance(budget, (tuple, list)) or len(budget) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in budget)):
        raise ValueError(f"budget must be None or a pair of ints (r_q, r_c), got {budget!r}")
    return [tuple(budget)]


def score(q, c, budget: Budget = None, q_mask=None, c_mask=None) -> torch.Tensor:
    """In-batch MaxSim (Nq, Nc) float32, at the full budget or at the prefix budget (r_q, r_c)."""
    return F.maxsim_grouped(q, c, groups_of(budget), q_mask=q_mask, c_mask=c_mask)[0]


def score_paired(q, c, budget: Budget = None, q_mask=None, c_mask=None) -> torch.Tensor:
    """Per-query MaxSim: q (B, Lq, D) against its own c (B, N, Lc, D) -> (B, N) float32."""
    return F.maxsim_paired_grouped(q, c, groups_of(budget), q_mask=q_mask, c_mask=c_mask)[0]
