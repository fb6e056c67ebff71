"""Fake (meta) kernels and autograd for every backend's ops (schemas: ``_schemas.py``).

Each backend registers the same op families under its own prefix (``metaembed::`` for the
C++ extension, ``metaembed::reference_*``, ``metaembed::triton_*``); the registrations here
are shared, so every backend has the same fake kernels, the same argument checks
(``_validation.check_*_op``) and the same autograd formula:

    (scores, argmax) = maxsim_grouped(q, c, ..., save_argmax)     scores (G, Nq, Nc)
    (dq, dc) = maxsim_grouped_backward(grad, q, c, ..., output_mask, argmax)

    (terms, lse, jq) = matryoshka_infonce(q, c, hn, labels, ..., query_gradient)
    (dq, dc, dhn) = matryoshka_infonce_backward(grad_terms, lse, q, c, hn, labels, ..., output_mask, jq)

terms[g, a] = lse[g, a] - logit_g(a, labels[a]) is the per-query cross-entropy of group g;
the backward recomputes similarity tiles instead of saving anything larger than lse. A
backend that fuses the query gradient into the forward (cpu, when q needs a gradient) also
returns jq = d terms_g(a) / d q[a] as (Nq, sum_g r_q(g), D); its backward then forms dq from
it and runs the tiles only for dc / dhn.

Real kernels allocate fresh contiguous outputs, so the fake kernels do too (never
``empty_like``, which would copy an input's strides). A gradient that autograd does not need
(``ctx.needs_input_grad``) is not computed: its ``output_mask`` flag is False and the op
returns an empty (0,) tensor in its place.
"""
from __future__ import annotations

import torch

from . import _validation as V


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores and losses are float32 (float64 only for float64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def gradient_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """What a backward op returns for input x: a contiguous tensor of x's shape and dtype,
    or the (0,) placeholder when the gradient was not asked for."""
    return x.new_empty(x.shape if wanted else (0,))  # new_empty is always contiguous


def saved_argmax_dtype(group_rc) -> torch.dtype:
    """int16 tokens, or int32 once a prefix reaches 2^15 tokens (csrc/common/checks.h)."""
    return torch.int16 if max(int(r) for r in group_rc) < 2**15 else torch.int32


def saved_argmax_shape(group_rq, group_rc, rows, cols) -> tuple:
    """(rows, cols, max r_q, distinct r_c): the argmax a forward saves for its backward."""
    return (rows, cols, max(int(r) for r in group_rq), len({int(r) for r in group_rc}))


def _never(device: torch.device) -> bool:
    return False


def register_scores(fwd: str, bwd: str, paired: bool = False, saves_argmax=_never) -> None:
    """Fake kernels for ``fwd`` / ``bwd`` (qualified names of a maxsim_grouped or
    maxsim_paired_grouped pair) and autograd for ``fwd``. ``saves_argmax(device)``: whether
    the op's kernel for that device returns the argmax when asked (save_argmax)."""
    bwd_op = _op(bwd)

    def fake_forward(q, c, group_rq, group_rc, q_mask, c_mask, save_argmax=False):
        V.check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired)
        n_cols = c.shape[1] if paired else c.shape[0]
        saved = save_argmax and saves_argmax(q.device)
        shape = saved_argmax_shape(group_rq, group_rc, q.shape[0], n_cols) if saved else (0,)
        return (q.new_empty((len(group_rq), q.shape[0], n_cols), dtype=score_dtype(q)),
                q.new_empty(shape, dtype=saved_argmax_dtype(group_rc)))

    def fake_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask, output_mask, argmax=None):
        V.check_maxsim_op(q, c, group_rq, group_rc, q_mask, c_mask, paired)
        V.check_scores_grad(grad, q, c, len(group_rq), paired)
        return gradient_like(q, output_mask[0]), gradient_like(c, output_mask[1])

    def setup_context(ctx, inputs, output):
        q, c, group_rq, group_rc, q_mask, c_mask = inputs[:6]
        _scores, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(q, c, q_mask, c_mask, argmax)
        ctx.groups = (group_rq, group_rc)

    def backward(ctx, grad, _grad_argmax):
        want_q, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_q or want_c):
            return (None,) * 7
        q, c, q_mask, c_mask, argmax = ctx.saved_tensors
        dq, dc = bwd_op(grad.contiguous(), q, c, *ctx.groups, q_mask, c_mask, [want_q, want_c],
                        argmax if argmax.numel() > 0 else None)
        return (dq if want_q else None), (dc if want_c else None), None, None, None, None, None

    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def query_gradient_shape(q: torch.Tensor, group_rq) -> tuple:
    """(Nq, sum_g r_q(g), D): the fused query gradient of matryoshka_infonce."""
    return (q.shape[0], sum(int(r) for r in group_rq), q.shape[2])


def register_infonce(fwd: str, bwd: str, fuses_query_gradient=_never) -> None:
    """Fake kernels for a matryoshka_infonce pair and autograd for ``fwd``.
    ``fuses_query_gradient(device)``: whether the op's kernel for that device computes jq in
    the forward when asked (the fake kernel must promise exactly what the real one returns)."""
    bwd_op = _op(bwd)

    def fake_forward(q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask, query_gradient=False):
        V.check_infonce_op(q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask)
        shape = (len(group_rq), q.shape[0])
        fused = query_gradient and fuses_query_gradient(q.device)
        jq_shape = query_gradient_shape(q, group_rq) if fused else (0,)
        return (q.new_empty(shape, dtype=score_dtype(q)), q.new_empty(shape, dtype=score_dtype(q)),
                q.new_empty(jq_shape, dtype=score_dtype(q)))

    def fake_backward(grad, lse, q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask,
                      output_mask, query_gradient=None):
        V.check_infonce_op(q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask)
        V.check_infonce_grad(grad, lse, len(group_rq), q.shape[0])
        return (gradient_like(q, output_mask[0]), gradient_like(c, output_mask[1]),
                gradient_like(hn, output_mask[2]))

    def setup_context(ctx, inputs, output):
        q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask = inputs[:10]
        _terms, lse, jq = output
        ctx.mark_non_differentiable(lse, jq)
        ctx.save_for_backward(q, c, hn, labels, lse, q_mask, c_mask, hn_mask, jq)
        ctx.static = (group_rq, group_rc, scale)

    def backward(ctx, grad_terms, _grad_lse, _grad_jq):
        wanted = [bool(ctx.needs_input_grad[k]) for k in range(3)]
        none = (None,) * 8
        if not any(wanted):
            return (None, None, None) + none
        q, c, hn, labels, lse, q_mask, c_mask, hn_mask, jq = ctx.saved_tensors
        group_rq, group_rc, scale = ctx.static
        grads = bwd_op(grad_terms.contiguous(), lse, q, c, hn, labels, group_rq, group_rc, scale,
                       q_mask, c_mask, hn_mask, wanted, jq if jq.numel() > 0 else None)
        return tuple(g if w else None for g, w in zip(grads, wanted)) + none

    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_all(prefix: str = "", namespace: str = "metaembed", fuses_query_gradient=_never,
                 saves_argmax=_never) -> None:
    """Fake kernels and autograd for one backend's three op families; the predicates say, per
    device, which optional outputs the backend's kernels produce (see the schemas)."""
    name = lambda op: f"{namespace}::{prefix}{op}"  # noqa: E731
    register_scores(name("maxsim_grouped"), name("maxsim_grouped_backward"), saves_argmax=saves_argmax)
    register_scores(name("maxsim_paired_grouped"), name("maxsim_paired_grouped_backward"), paired=True,
                    saves_argmax=saves_argmax)
    register_infonce(name("matryoshka_infonce"), name("matryoshka_infonce_backward"), fuses_query_gradient)
