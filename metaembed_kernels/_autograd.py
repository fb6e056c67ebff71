"""Fake (meta) and autograd registrations shared by every kernel backend.

Each backend provides two op pairs with the same schemas (see csrc/ops.cpp):

    maxsim_grouped(q, c, group_rq, group_rc, q_mask, c_mask) -> scores (G, Nq, Nc)
    maxsim_grouped_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask) -> (dq, dc)

    matryoshka_infonce(q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask)
        -> (terms (G, Nq), lse (G, Nq))
    matryoshka_infonce_backward(grad_terms, lse, q, c, hn, labels, group_rq, group_rc, scale,
                                q_mask, c_mask, hn_mask) -> (dq, dc, dhn)

terms[g, a] = lse[g, a] - logit_g(a, labels[a]) is the per-query cross-entropy of group g;
the backward recomputes similarity tiles instead of saving anything larger than lse.
"""
from __future__ import annotations

import torch


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores and losses are float32 (float64 only for float64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def register_maxsim(fwd: str, bwd: str) -> None:
    """Fake kernels for both ops and autograd for ``fwd`` (qualified op names)."""
    bwd_op = _op(bwd)

    def fake_forward(q, c, group_rq, group_rc, q_mask, c_mask):
        return q.new_empty((len(group_rq), q.shape[0], c.shape[0]), dtype=score_dtype(q))

    def fake_backward(grad, q, c, group_rq, group_rc, q_mask, c_mask):
        return torch.empty_like(q), torch.empty_like(c)

    def setup_context(ctx, inputs, output):
        q, c, group_rq, group_rc, q_mask, c_mask = inputs
        ctx.save_for_backward(q, c, q_mask, c_mask)
        ctx.groups = (group_rq, group_rc)

    def backward(ctx, grad):
        q, c, q_mask, c_mask = ctx.saved_tensors
        dq, dc = bwd_op(grad.contiguous(), q, c, *ctx.groups, q_mask, c_mask)
        return dq, dc, None, None, None, None

    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_infonce(fwd: str, bwd: str) -> None:
    """Fake kernels for both ops and autograd for ``fwd`` (qualified op names)."""
    bwd_op = _op(bwd)

    def fake_forward(q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask):
        shape = (len(group_rq), q.shape[0])
        return q.new_empty(shape, dtype=score_dtype(q)), q.new_empty(shape, dtype=score_dtype(q))

    def fake_backward(grad, lse, q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask):
        return torch.empty_like(q), torch.empty_like(c), torch.empty_like(hn)

    def setup_context(ctx, inputs, output):
        q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask = inputs
        _terms, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, c, hn, labels, lse, q_mask, c_mask, hn_mask)
        ctx.static = (group_rq, group_rc, scale)

    def backward(ctx, grad_terms, _grad_lse):
        q, c, hn, labels, lse, q_mask, c_mask, hn_mask = ctx.saved_tensors
        group_rq, group_rc, scale = ctx.static
        dq, dc, dhn = bwd_op(
            grad_terms.contiguous(), lse, q, c, hn, labels, group_rq, group_rc, scale, q_mask, c_mask, hn_mask
        )
        return dq, dc, dhn, None, None, None, None, None, None, None

    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
