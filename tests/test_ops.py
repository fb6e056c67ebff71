"""Custom-op plumbing on every backend that runs here: gradcheck in float64,
torch.library.opcheck on contiguous / transposed / sliced / expanded inputs, fake kernels
that return the real strides, and the output_mask contract of the backward ops."""
import pytest
import torch

from helpers import op_backends, ops_of, requires_extension
from metaembed_kernels import matryoshka_infonce, maxsim_grouped, maxsim_paired_grouped

GROUPS = ((1, 1), (3, 2), (2, 5))
RQ, RC = [1, 3, 2], [1, 2, 5]
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x (n, r, ..., d) in a given memory layout (same shape)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # dims 0 and 1 swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # every other element of a wider last dim (D stride 2)
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded":  # one row broadcast along dim 0 (stride 0)
        return x[:1].expand(x.shape)
    raise ValueError(layout)


def inputs(dtype=torch.float64, nq=3, nc=4, rq=3, rc=5, d=6, k=2, masks=True, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    q = laid_out(torch.randn(nq, rq, d, generator=gen).to(dtype), layout)
    c = laid_out(torch.randn(nc, rc, d, generator=gen).to(dtype), layout)
    hn = laid_out(torch.randn(nq, k, rc, d, generator=gen).to(dtype), layout)
    cp = laid_out(torch.randn(nq, 2, rc, d, generator=gen).to(dtype), layout)  # paired candidates
    qm = cm = hm = cpm = None
    if masks:
        qm = torch.rand(nq, rq, generator=gen) > 0.2
        cm = torch.rand(nc, rc, generator=gen) > 0.2
        hm = torch.rand(nq, k, rc, generator=gen) > 0.2
        cpm = torch.rand(nq, 2, rc, generator=gen) > 0.2
        cm[1, :2] = False
        cpm[0, 1] = False
    return q, c, hn, cp, qm, cm, hm, cpm


def _dtype_for(backend: str) -> torch.dtype:
    return torch.float64 if backend in ("cpu", "reference") else torch.float32


GRADCHECK_CASES = [("cpu", False), ("cpu", True), ("reference", True)]  # the reference is slow


@pytest.mark.parametrize("backend,masks", GRADCHECK_CASES)
def test_gradcheck_scores(backend, masks):
    q, c, _, cp, qm, cm, _, cpm = inputs(masks=masks)
    q.requires_grad_()
    c.requires_grad_()
    cp.requires_grad_()
    fn = lambda q, c: maxsim_grouped(q, c, GROUPS, q_mask=qm, c_mask=cm, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, c), eps=1e-6, atol=1e-7)
    fn = lambda q, c: maxsim_paired_grouped(q, c, GROUPS, q_mask=qm, c_mask=cpm, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, cp), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,masks", GRADCHECK_CASES)
def test_gradcheck_matryoshka_infonce(backend, masks):
    q, c, hn, _, qm, cm, hm, _ = inputs(masks=masks, nc=5)
    for t in (q, c, hn):
        t.requires_grad_()
    labels = torch.tensor([4, 0, 2])

    def fn(q, c, hn):
        return matryoshka_infonce(
            q, c, GROUPS, weights=(1.0, 0.5, 2.0), temperature=0.7, hard_negatives=hn, hard_negatives_mask=hm,
            q_mask=qm, c_mask=cm, labels=labels, backend=backend, return_group_losses=True,
        )

    assert torch.autograd.gradcheck(fn, (q, c, hn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", op_backends())
def test_opcheck_forward_ops(backend, layout):
    """Every forward op (with autograd, so its backward op runs too) on every memory layout."""
    q, c, hn, cp, qm, cm, hm, cpm = inputs(_dtype_for(backend), nc=5, layout=layout)
    for t in (q, c, hn, cp):
        t.requires_grad_()
    ops = ops_of(backend)
    torch.library.opcheck(ops("maxsim_grouped"), (q, c, RQ, RC, qm, cm))
    torch.library.opcheck(ops("maxsim_paired_grouped"), (q, cp, RQ, RC, qm, cpm))
    # with the argmax saved for the backward where the backend does (cpu)
    torch.library.opcheck(ops("maxsim_grouped"), (q, c, RQ, RC, qm, cm, True))
    torch.library.opcheck(ops("maxsim_paired_grouped"), (q, cp, RQ, RC, qm, cpm, True))
    labels = torch.tensor([1, 4, 0])
    torch.library.opcheck(ops("matryoshka_infonce"), (q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm))
    # with the query gradient fused into the forward where the backend can (cpu)
    torch.library.opcheck(ops("matryoshka_infonce"), (q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, True))


@pytest.mark.parametrize("output_mask", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("backend", op_backends())
def test_opcheck_backward_ops(backend, output_mask):
    q, c, hn, cp, qm, cm, hm, cpm = inputs(_dtype_for(backend), nc=5, layout="transposed")
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(5)
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask2 = list(output_mask)
    torch.library.opcheck(ops("maxsim_grouped_backward"),
                          (torch.randn(3, 3, 5, generator=gen).to(sd), q, c, RQ, RC, qm, cm, mask2))
    torch.library.opcheck(ops("maxsim_paired_grouped_backward"),
                          (torch.randn(3, 3, 2, generator=gen).to(sd), q, cp, RQ, RC, qm, cpm, mask2))
    labels = torch.tensor([1, 4, 0])
    _, lse, _ = ops("matryoshka_infonce")(q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm)
    torch.library.opcheck(ops("matryoshka_infonce_backward"),
                          (torch.randn(3, 3, generator=gen).to(sd), lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm,
                           mask2 + [not output_mask[1]]))


@pytest.mark.parametrize("backend", op_backends())
def test_fake_kernels_return_the_real_strides_and_check_shapes(backend):
    """The real kernels allocate fresh contiguous outputs; the fake kernels promise exactly
    that, whatever the input strides, and reject what the real kernels reject."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, c, hn, cp, qm, cm, hm, cpm = inputs(_dtype_for(backend), nc=5, layout="transposed")
    ops = ops_of(backend)
    labels = torch.tensor([1, 4, 0])
    real = [*ops("maxsim_grouped")(q, c, RQ, RC, qm, cm, True),
            *ops("maxsim_grouped_backward")(torch.ones(3, 3, 5, dtype=real_dtype(q)), q, c, RQ, RC, qm, cm,
                                             [True, True]),
            *ops("matryoshka_infonce")(q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm)]
    with FakeTensorMode() as mode:
        f = [mode.from_tensor(t) if t is not None else None for t in (q, c, hn, qm, cm, hm, labels)]
        fq, fc, fhn, fqm, fcm, fhm, flab = f
        fake = [*ops("maxsim_grouped")(fq, fc, RQ, RC, fqm, fcm, True),
                *ops("maxsim_grouped_backward")(torch.ones(3, 3, 5, dtype=real_dtype(q)), fq, fc, RQ, RC, fqm, fcm,
                                                 [True, True]),
                *ops("matryoshka_infonce")(fq, fc, fhn, flab, RQ, RC, 2.5, fqm, fcm, fhm)]
        for r, fk in zip(real, fake):
            assert (tuple(fk.shape), fk.stride(), fk.dtype) == (tuple(r.shape), r.stride(), r.dtype)
        with pytest.raises(ValueError, match="embedding dim"):
            ops("maxsim_grouped")(fq, fc[..., :3], RQ, RC, None, None)
        with pytest.raises(ValueError, match=r"groups\[0\]"):
            ops("maxsim_grouped")(fq, fc, [9], [1], None, None)


def real_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend", op_backends())
def test_backward_ops_skip_unwanted_gradients(backend):
    """output_mask: an unwanted gradient comes back as the (0,) placeholder, and the wanted
    ones equal the full computation's."""
    q, c, hn, cp, qm, cm, hm, cpm = inputs(_dtype_for(backend), nc=5)
    ops = ops_of(backend)
    grad = torch.randn(3, 3, 5, dtype=real_dtype(q))
    full = ops("maxsim_grouped_backward")(grad, q, c, RQ, RC, qm, cm, [True, True])
    only_q = ops("maxsim_grouped_backward")(grad, q, c, RQ, RC, qm, cm, [True, False])
    only_c = ops("maxsim_grouped_backward")(grad, q, c, RQ, RC, qm, cm, [False, True])
    assert only_q[1].shape == (0,) and only_c[0].shape == (0,)
    assert torch.equal(only_q[0], full[0]) and torch.equal(only_c[1], full[1])
    labels = torch.tensor([1, 4, 0])
    _, lse, _ = ops("matryoshka_infonce")(q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm)
    g = torch.randn(3, 3, dtype=real_dtype(q))
    full = ops("matryoshka_infonce_backward")(g, lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, [True] * 3)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        part = ops("matryoshka_infonce_backward")(g, lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, mask)
        for k in range(3):
            if mask[k]:
                torch.testing.assert_close(part[k], full[k], rtol=0, atol=0)
            else:
                assert part[k].shape == (0,)


class _RecordBackwardMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output_mask argument of every metaembed backward op call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "metaembed" and func.__name__.split(".")[0].endswith("_backward"):
            names = [arg.name for arg in func._schema.arguments]
            self.masks.append(tuple(args[names.index("output_mask")]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", op_backends())
def test_autograd_asks_only_for_the_gradients_it_needs(backend):
    q, c, hn, cp, *_ = inputs(_dtype_for(backend), nc=5)
    q.requires_grad_()  # c, hn and cp frozen (a frozen candidate encoder)
    with _RecordBackwardMasks() as rec:
        maxsim_grouped(q, c, GROUPS, backend=backend).sum().backward()
        maxsim_paired_grouped(q, cp, GROUPS, backend=backend).sum().backward()
        matryoshka_infonce(q, c, GROUPS, hard_negatives=hn, labels=torch.tensor([1, 4, 0]),
                           backend=backend).backward()
    assert rec.masks == [(True, False), (True, False), (True, False, False)]
    q.requires_grad_(False)
    hn.requires_grad_()
    with _RecordBackwardMasks() as rec:
        matryoshka_infonce(q, c, GROUPS, hard_negatives=hn, labels=torch.tensor([1, 4, 0]),
                           backend=backend).backward()
    assert rec.masks == [(False, False, True)]
    assert hn.grad is not None and hn.grad.shape == hn.shape


@requires_extension
def test_extension_registers_every_op_for_cpu():
    from metaembed_kernels import _extension

    assert _extension.has_kernel("cpu")


@pytest.mark.parametrize("backend", op_backends())
@pytest.mark.parametrize("masks", [False, True])
def test_fused_query_gradient_equals_the_second_pass(backend, masks):
    """query_gradient=True: a backend that fuses dq into the forward (cpu) returns
    d terms_g(a) / d q[a] as (Nq, sum_g r_q(g), D); the backward's dq from it equals the dq of
    the second pass over the tiles. Other backends return the (0,) placeholder."""
    q, c, hn, _, qm, cm, hm, _ = inputs(_dtype_for(backend), nc=5, masks=masks, d=9)
    ops = ops_of(backend)
    labels = torch.tensor([1, 4, 0])
    terms, lse, jq = ops("matryoshka_infonce")(q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, True)
    plain = ops("matryoshka_infonce")(q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm)
    assert plain[2].shape == (0,)
    torch.testing.assert_close(terms, plain[0])
    torch.testing.assert_close(lse, plain[1])
    if backend != "cpu":
        assert jq.shape == (0,)
        return
    assert jq.shape == (3, sum(RQ), q.shape[2]) and jq.dtype == real_dtype(q)
    grad = torch.randn(3, 3, dtype=real_dtype(q), generator=torch.Generator().manual_seed(2))
    for mask in ([True, True, True], [True, False, False], [True, False, True]):
        fused = ops("matryoshka_infonce_backward")(grad, lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, mask, jq)
        second = ops("matryoshka_infonce_backward")(grad, lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, mask)
        for k in range(3):
            torch.testing.assert_close(fused[k], second[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"query_gradient must have shape"):
        ops("matryoshka_infonce_backward")(grad, lse, q, c, hn, labels, RQ, RC, 2.5, qm, cm, hm, [True] * 3, jq[:, 1:])


@pytest.mark.parametrize("backend", op_backends())
@pytest.mark.parametrize("paired", [False, True], ids=["in-batch", "paired"])
def test_saved_argmax_backward_equals_the_recompute(backend, paired):
    """save_argmax=True: a backend that saves the forward's maximising tokens (cpu) returns
    them, (rows, cols, max r_q, distinct r_c) int16, and its backward given them (no tile
    recomputed) equals the recomputing backward bitwise. Others return the placeholder."""
    q, c, _, cp, qm, cm, _, cpm = inputs(_dtype_for(backend), nc=5, d=9)
    ops = ops_of(backend)
    name = "maxsim_paired_grouped" if paired else "maxsim_grouped"
    cand, mask = (cp, cpm) if paired else (c, cm)
    scores, argmax = ops(name)(q, cand, RQ, RC, qm, mask, True)
    plain, placeholder = ops(name)(q, cand, RQ, RC, qm, mask)
    assert placeholder.shape == (0,) and placeholder.dtype == torch.int16
    assert torch.equal(scores, plain)
    if backend != "cpu":
        assert argmax.shape == (0,)
        return
    cols = cand.shape[1] if paired else cand.shape[0]
    assert argmax.shape == (3, cols, max(RQ), len(set(RC))) and argmax.dtype == torch.int16
    grad = torch.randn(scores.shape, dtype=scores.dtype, generator=torch.Generator().manual_seed(3))
    for mask2 in ([True, True], [True, False], [False, True]):
        saved = ops(name + "_backward")(grad, q, cand, RQ, RC, qm, mask, mask2, argmax)
        again = ops(name + "_backward")(grad, q, cand, RQ, RC, qm, mask, mask2)
        for a, b in zip(saved, again):
            assert torch.equal(a, b)
    bad = argmax.clone()
    bad.view(-1)[0] = max(RC)  # a token past the budget would be an out-of-bounds address
    with pytest.raises(ValueError, match=r"argmax values must be candidate tokens in \[-1, 5\)"):
        ops(name + "_backward")(grad, q, cand, RQ, RC, qm, mask, [True, True], bad)
    with pytest.raises(ValueError, match=r"argmax must have shape"):
        ops(name + "_backward")(grad, q, cand, RQ, RC, qm, mask, [True, True], argmax[:, :1])
