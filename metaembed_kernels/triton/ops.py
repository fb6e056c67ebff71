"""The "triton" backend's ops, registered with torch.library from the shared schema table
(``_schemas.SCHEMAS``, prefixed ``triton_``), with the shared fake kernels and autograd
(``_autograd.register_all``):

    metaembed::triton_maxsim_grouped(q, c, group_rq, group_rc, q_mask, c_mask, save_argmax=False)
        -> (scores (G, Nq, Nc), (0,) argmax placeholder: the backward recomputes the tiles)
    metaembed::triton_maxsim_grouped_backward(grad, q, c, ..., output_mask, argmax=None) -> (dq, dc)
    metaembed::triton_maxsim_paired_grouped(q (B,Rq,D), c (B,N,Rc,D), ...) -> (scores (G, B, N), placeholder)
    metaembed::triton_maxsim_paired_grouped_backward(grad, q, c, ..., output_mask, argmax=None) -> (dq, dc)
    metaembed::triton_matryoshka_infonce(q, c, hn, labels, group_rq, group_rc, scale, masks..,
                                         query_gradient=False) -> (terms, lse, (0,) placeholder)
    metaembed::triton_matryoshka_infonce_backward(grad, lse, q, c, hn, labels, ..., output_mask,
                                                  query_gradient=None) -> (dq, dc, dhn)

They are opaque custom ops (torch.compile calls them as units). They run CUDA tensors, and
CPU tensors under TRITON_INTERPRET=1. Scores/terms/lse are float32; gradients have the
input dtype (accumulated in fp32, rounded once); a gradient whose output_mask flag is False
is neither allocated nor computed, and comes back as an empty (0,) tensor.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _autograd
from .._schemas import SCHEMAS
from . import launch

Tensor = torch.Tensor
PREFIX = "triton_"


def _define(name: str):
    return torch.library.custom_op(f"metaembed::{PREFIX}{name}", mutates_args=(), schema=SCHEMAS[name])


def _gradient(acc: Optional[Tensor], like: Tensor, wanted: bool) -> Tensor:
    return acc.to(like.dtype) if wanted else like.new_empty((0,))


def _no_argmax(q: Tensor, group_rc: List[int]) -> Tensor:
    """The argmax placeholder: the triton backward recomputes the tiles instead of saving them."""
    return q.new_empty((0,), dtype=_autograd.saved_argmax_dtype(group_rc))


@_define("maxsim_grouped")
def _maxsim_grouped(q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                    q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                    save_argmax: bool = False) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    out, plans = launch.plan_maxsim_forward(problem)
    launch.run(plans)
    return out, _no_argmax(q, group_rc)


@_define("maxsim_grouped_backward")
def _maxsim_grouped_backward(grad: Tensor, q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                             q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                             output_mask: List[bool], argmax: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask)
    dq, dc, plans = launch.plan_maxsim_backward(problem, grad, output_mask)
    launch.run(plans)
    return _gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1])


@_define("maxsim_paired_grouped")
def _maxsim_paired_grouped(q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                           q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                           save_argmax: bool = False) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask, paired=True)
    out, plans = launch.plan_maxsim_paired_forward(problem)
    launch.run(plans)
    return out, _no_argmax(q, group_rc)


@_define("maxsim_paired_grouped_backward")
def _maxsim_paired_grouped_backward(grad: Tensor, q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                                    q_mask: Optional[Tensor], c_mask: Optional[Tensor], output_mask: List[bool],
                                    argmax: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    problem = launch.make_problem(q, c, group_rq, group_rc, q_mask, c_mask, paired=True)
    dq, dc, plans = launch.plan_maxsim_paired_backward(problem, grad, output_mask)
    launch.run(plans)
    return _gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1])


@_define("matryoshka_infonce")
def _matryoshka_infonce(q: Tensor, c: Tensor, hard_negatives: Tensor, labels: Tensor, group_rq: List[int],
                        group_rc: List[int], scale: float, q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                        hard_negatives_mask: Optional[Tensor],
                        query_gradient: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    problem, negatives, labels = launch.make_infonce_problem(q, c, hard_negatives, labels, group_rq, group_rc,
                                                             scale, q_mask, c_mask, hard_negatives_mask)
    lse, positive, plans = launch.plan_infonce_forward(problem, negatives, labels, scale)
    launch.run(plans)
    return lse - positive, lse, lse.new_empty((0,))  # query_gradient is not fused: dq comes from the backward


@_define("matryoshka_infonce_backward")
def _matryoshka_infonce_backward(grad: Tensor, lse: Tensor, q: Tensor, c: Tensor, hard_negatives: Tensor,
                                 labels: Tensor, group_rq: List[int], group_rc: List[int], scale: float,
                                 q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                                 hard_negatives_mask: Optional[Tensor], output_mask: List[bool],
                                 query_gradient: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    problem, negatives, labels = launch.make_infonce_problem(q, c, hard_negatives, labels, group_rq, group_rc,
                                                             scale, q_mask, c_mask, hard_negatives_mask, grad, lse)
    dq, dc, dhn, plans = launch.plan_infonce_backward(problem, negatives, labels, scale, grad, lse, output_mask)
    launch.run(plans)
    return (_gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1]),
            _gradient(dhn, hard_negatives, output_mask[2]))


_autograd.register_all(PREFIX)
