"""The op schemas, one table for every backend.

The C++ extension declares the same strings in csrc/common/schemas.h (``TORCH_LIBRARY``);
the Python-defined backends (``reference_*``, ``triton_*``) register from this table, and
tests/test_schemas.py checks that the C++ declarations equal it, so no backend can drift.

Op families (every backend registers each under its prefix: "", "reference_", "triton_"):

    maxsim_grouped(q (Nq,Rq,D), c (Nc,Rc,D), ...)             -> scores (G, Nq, Nc)
    maxsim_paired_grouped(q (B,Rq,D), c (B,N,Rc,D), ...)      -> scores (G, B, N)
    matryoshka_infonce(q, c, hard_negatives, labels, ...)     -> (terms (G, Nq), lse (G, Nq))

and a ``*_backward`` op each. Backward ops take ``output_mask`` (as ATen's
``convolution_backward`` does): a gradient whose flag is False is not computed and comes
back as an empty tensor of shape (0,).
"""
from __future__ import annotations

from typing import Dict

SCHEMAS: Dict[str, str] = {
    # (scores, argmax): scores[g, a, b] = sum_{i < group_rq[g], q valid} max_{j < group_rc[g], c valid}
    # <q[a,i], c[b,j]>. save_argmax=True asks a backend that can (cpu) to also return the
    # maximising tokens, (Nq, Nc, max r_q, distinct r_c) int16 (int32 from r_c = 2^15), so that
    # its backward (given argmax) scatters without recomputing any tile; else argmax is (0,).
    "maxsim_grouped": (
        "(Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask, Tensor? c_mask,"
        " bool save_argmax=False) -> (Tensor, Tensor)"
    ),
    "maxsim_grouped_backward": (
        "(Tensor grad, Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask, Tensor? c_mask,"
        " bool[2] output_mask, Tensor? argmax=None) -> (Tensor, Tensor)"
    ),
    # the same, for query a against its own candidates c[a, n]: (G, B, N), argmax (B, N, ..)
    "maxsim_paired_grouped": (
        "(Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask, Tensor? c_mask,"
        " bool save_argmax=False) -> (Tensor, Tensor)"
    ),
    "maxsim_paired_grouped_backward": (
        "(Tensor grad, Tensor q, Tensor c, int[] group_rq, int[] group_rc, Tensor? q_mask, Tensor? c_mask,"
        " bool[2] output_mask, Tensor? argmax=None) -> (Tensor, Tensor)"
    ),
    # (terms, lse, query_gradient): terms and lse (G, Nq), terms[g, a] = lse[g, a] -
    # logit_g(a, labels[a]), logits_g[a] = scale * concat(s_g(a, c[:]), s_g(a, hard_negatives[a, :])).
    # query_gradient=True asks a backend that can (cpu) to compute d terms_g(a) / d q[a] in the
    # same pass: (Nq, sum_g r_q(g), D), group g's rows at offset sum_{g' < g} r_q(g'); the
    # backward then needs no second pass for dq. Otherwise it is an empty (0,) tensor.
    "matryoshka_infonce": (
        "(Tensor q, Tensor c, Tensor hard_negatives, Tensor labels, int[] group_rq, int[] group_rc,"
        " float scale, Tensor? q_mask, Tensor? c_mask, Tensor? hard_negatives_mask, bool query_gradient=False)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    "matryoshka_infonce_backward": (
        "(Tensor grad, Tensor lse, Tensor q, Tensor c, Tensor hard_negatives, Tensor labels, int[] group_rq,"
        " int[] group_rc, float scale, Tensor? q_mask, Tensor? c_mask, Tensor? hard_negatives_mask,"
        " bool[3] output_mask, Tensor? query_gradient=None) -> (Tensor, Tensor, Tensor)"
    ),
}

OP_NAMES = tuple(SCHEMAS)
FORWARD_OPS = ("maxsim_grouped", "maxsim_paired_grouped", "matryoshka_infonce")


def qualified(name: str, prefix: str = "", namespace: str = "metaembed") -> str:
    return f"{namespace}::{prefix}{name}"
