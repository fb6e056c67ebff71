"""The "triton" backend's ops, registered with torch.library under the schemas of
csrc/ops.cpp (prefixed ``triton_``), with fake kernels and autograd from ``_autograd``:

    metaembed::triton_maxsim_grouped(q, c, group_rq, group_rc, q_mask, c_mask) -> scores
    metaembed::triton_maxsim_grouped_backward(grad, q, c, ...) -> (dq, dc)
    metaembed::triton_matryoshka_infonce(q, c, hn, labels, group_rq, group_rc, scale, masks..)
        -> (terms, lse)
    metaembed::triton_matryoshka_infonce_backward(grad, lse, q, c, hn, labels, ...) -> (dq, dc, dhn)

They are opaque custom ops (torch.compile calls them as units). They run CUDA tensors, and
CPU tensors under TRITON_INTERPRET=1. Scores/terms/lse are float32; gradients have the
input dtype (accumulated in fp32, rounded once).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _autograd
from .._schemas import SCHEMAS
from . import launch

Tensor = torch.Tensor

MAXSIM = "metaembed::triton_maxsim_grouped"
MAXSIM_BACKWARD = "metaembed::triton_maxsim_grouped_backward"
INFONCE = "metaembed::triton_matryoshka_infonce"
INFONCE_BACKWARD = "metaembed::triton_matryoshka_infonce_backward"


@torch.library.custom_op(MAXSIM, mutates_args=(), schema=SCHEMAS["maxsim_grouped"])
def _maxsim_grouped(q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                    q_mask: Optional[Tensor], c_mask: Optional[Tensor]) -> Tensor:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    out, plans = launch.plan_maxsim_forward(problem)
    launch.run(plans)
    return out


@torch.library.custom_op(MAXSIM_BACKWARD, mutates_args=(), schema=SCHEMAS["maxsim_grouped_backward"])
def _maxsim_grouped_backward(grad: Tensor, q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                             q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                             output_mask: List[bool]) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    dq, dc, plans = launch.plan_maxsim_backward(problem, grad, output_mask)
    launch.run(plans)
    return _gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1])


def _gradient(acc: Tensor, like: Tensor, wanted: bool) -> Tensor:
    return acc.to(like.dtype) if wanted else like.new_empty((0,))


@torch.library.custom_op(INFONCE, mutates_args=(), schema=SCHEMAS["matryoshka_infonce"])
def _matryoshka_infonce(q: Tensor, c: Tensor, hard_negatives: Tensor, labels: Tensor, group_rq: List[int],
                        group_rc: List[int], scale: float, q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                        hard_negatives_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    negatives = launch.make_hard_negatives(problem, hard_negatives, hard_negatives_mask)
    lse, positive, plans = launch.plan_infonce_forward(problem, negatives, labels, scale)
    launch.run(plans)
    return lse - positive, lse


@torch.library.custom_op(INFONCE_BACKWARD, mutates_args=(), schema=SCHEMAS["matryoshka_infonce_backward"])
def _matryoshka_infonce_backward(grad: Tensor, lse: Tensor, q: Tensor, c: Tensor, hard_negatives: Tensor,
                                 labels: Tensor, group_rq: List[int], group_rc: List[int], scale: float,
                                 q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                                 hard_negatives_mask: Optional[Tensor],
                                 output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    negatives = launch.make_hard_negatives(problem, hard_negatives, hard_negatives_mask)
    dq, dc, dhn, plans = launch.plan_infonce_backward(problem, negatives, labels, scale, grad, lse, output_mask)
    launch.run(plans)
    return (_gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1]),
            _gradient(dhn, hard_negatives, output_mask[2]))


_autograd.register_scores(MAXSIM, MAXSIM_BACKWARD)
_autograd.register_infonce(INFONCE, INFONCE_BACKWARD)

