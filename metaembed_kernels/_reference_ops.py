"""The "reference" backend's ops: ``metaembed::reference_*``, registered from the shared
schema table (``_schemas.py``) with the shared fake kernels and autograd (``_autograd.py``).

They run the readable maths of ``reference.py`` (which materialises the similarity tensor)
on any device, so the reference backend behaves like every kernel backend: an opaque custom
op under torch.compile, the same argument checks, the same ``output_mask`` contract.
Importing this module registers the ops (backends.py does so at import).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _autograd
from . import _validation as V
from . import reference
from ._schemas import SCHEMAS

Tensor = torch.Tensor
PREFIX = "reference_"


def _define(name: str):
    return torch.library.custom_op(f"metaembed::{PREFIX}{name}", mutates_args=(), schema=SCHEMAS[name])


def _groups(group_rq, group_rc):
    return tuple(zip((int(v) for v in group_rq), (int(v) for v in group_rc)))


def _gradient(g: Optional[Tensor], like: Tensor, wanted: bool) -> Tensor:
    if not wanted:
        return like.new_empty((0,))
    return g.to(like.dtype).contiguous()


def _scores(q, c, group_rq, group_rc, q_mask, c_mask, paired: bool) -> Tuple[Tensor, Tensor]:
    # The argmax is not saved here (save_argmax is ignored): the backward recomputes.
    V.check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired)
    fn = reference.maxsim_grouped_paired if paired else reference.maxsim_grouped
    scores = fn(q, c, _groups(group_rq, group_rc), q_mask, c_mask).contiguous()
    return scores, q.new_empty((0,), dtype=_autograd.saved_argmax_dtype(group_rc))


def _scores_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask, output_mask, argmax, paired: bool):
    V.check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired)
    torch._check_value(argmax is None or argmax.numel() == 0,
                       lambda: "argmax: the reference backend's forward saves none")
    V.check_scores_grad(grad, q, c, len(group_rq), paired)
    dq, dc = reference.scores_backward(grad, q, c, _groups(group_rq, group_rc), q_mask, c_mask, paired, output_mask)
    return _gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1])


@_define("maxsim_grouped")
def _maxsim_grouped(q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                    q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                    save_argmax: bool = False) -> Tuple[Tensor, Tensor]:
    return _scores(q, c, group_rq, group_rc, q_mask, c_mask, paired=False)


@_define("maxsim_grouped_backward")
def _maxsim_grouped_backward(grad: Tensor, q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                             q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                             output_mask: List[bool], argmax: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _scores_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask, output_mask, argmax, paired=False)


@_define("maxsim_paired_grouped")
def _maxsim_paired_grouped(q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                           q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                           save_argmax: bool = False) -> Tuple[Tensor, Tensor]:
    return _scores(q, c, group_rq, group_rc, q_mask, c_mask, paired=True)


@_define("maxsim_paired_grouped_backward")
def _maxsim_paired_grouped_backward(grad: Tensor, q: Tensor, c: Tensor, group_rq: List[int], group_rc: List[int],
                                    q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                                    output_mask: List[bool],
                                    argmax: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _scores_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask, output_mask, argmax, paired=True)


@_define("matryoshka_infonce")
def _matryoshka_infonce(q: Tensor, c: Tensor, hard_negatives: Tensor, labels: Tensor, group_rq: List[int],
                        group_rc: List[int], scale: float, q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                        hard_negatives_mask: Optional[Tensor], query_gradient: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    # query_gradient is not fused here: the backward forms every gradient in closed form.
    V.check_infonce_op(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hard_negatives_mask)
    V.check_label_values(labels, c.shape[0])
    terms, lse = reference.infonce_terms(q, c, hard_negatives, labels, _groups(group_rq, group_rc), scale,
                                         q_mask, c_mask, hard_negatives_mask)
    return terms.contiguous(), lse.contiguous(), lse.new_empty((0,))


@_define("matryoshka_infonce_backward")
def _matryoshka_infonce_backward(grad: Tensor, lse: Tensor, q: Tensor, c: Tensor, hard_negatives: Tensor,
                                 labels: Tensor, group_rq: List[int], group_rc: List[int], scale: float,
                                 q_mask: Optional[Tensor], c_mask: Optional[Tensor],
                                 hard_negatives_mask: Optional[Tensor], output_mask: List[bool],
                                 query_gradient: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    V.check_infonce_op(q, c, hard_negatives, labels, group_rq, group_rc, scale, q_mask, c_mask, hard_negatives_mask)
    torch._check_value(query_gradient is None or query_gradient.numel() == 0,
                       lambda: "query_gradient: the reference backend's forward returns an empty one")
    V.check_infonce_grad(grad, lse, len(group_rq), q.shape[0])
    V.check_label_values(labels, c.shape[0])
    dq, dc, dhn = reference.infonce_backward(grad, lse, q, c, hard_negatives, labels, _groups(group_rq, group_rc),
                                             scale, q_mask, c_mask, hard_negatives_mask, output_mask)
    return (_gradient(dq, q, output_mask[0]), _gradient(dc, c, output_mask[1]),
            _gradient(dhn, hard_negatives, output_mask[2]))


_autograd.register_all(PREFIX)
