"""Custom-op plumbing: gradcheck in float64, torch.library.opcheck, torch.compile."""
import pytest
import torch

from helpers import requires_extension
from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped, reference

pytestmark = requires_extension
GROUPS = ((1, 1), (3, 2), (2, 5))


def inputs(dtype=torch.float64, nq=3, nc=4, rq=3, rc=5, d=6, k=2, masks=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, rq, d, generator=gen).to(dtype)
    c = torch.randn(nc, rc, d, generator=gen).to(dtype)
    hn = torch.randn(nq, k, rc, d, generator=gen).to(dtype)
    qm = cm = hm = None
    if masks:
        qm = torch.rand(nq, rq, generator=gen) > 0.2
        cm = torch.rand(nc, rc, generator=gen) > 0.2
        hm = torch.rand(nq, k, rc, generator=gen) > 0.2
        cm[1, :2] = False
    return q, c, hn, qm, cm, hm


@pytest.mark.parametrize("masks", [False, True])
def test_gradcheck_maxsim_grouped(masks):
    q, c, _, qm, cm, _ = inputs(masks=masks)
    q.requires_grad_()
    c.requires_grad_()
    fn = lambda q, c: maxsim_grouped(q, c, GROUPS, q_mask=qm, c_mask=cm, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, c), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("masks", [False, True])
def test_gradcheck_matryoshka_infonce(masks):
    q, c, hn, qm, cm, hm = inputs(masks=masks, nc=5)
    for t in (q, c, hn):
        t.requires_grad_()
    labels = torch.tensor([4, 0, 2])

    def fn(q, c, hn):
        return matryoshka_infonce(
            q, c, GROUPS, weights=(1.0, 0.5, 2.0), temperature=0.7, hard_negatives=hn, hard_negatives_mask=hm,
            q_mask=qm, c_mask=cm, labels=labels, backend="cpu", return_group_losses=True,
        )

    assert torch.autograd.gradcheck(fn, (q, c, hn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masks", [False, True])
def test_opcheck_maxsim_grouped(dtype, masks):
    q, c, _, qm, cm, _ = inputs(dtype, masks=masks)
    q.requires_grad_()
    c.requires_grad_()
    torch.library.opcheck(torch.ops.metaembed.maxsim_grouped.default, (q, c, [1, 3, 2], [1, 2, 5], qm, cm))
    grad = torch.randn(3, q.shape[0], c.shape[0])
    torch.library.opcheck(
        torch.ops.metaembed.maxsim_grouped_backward.default,
        (grad.to(torch.float64 if dtype == torch.float64 else torch.float32), q.detach(), c.detach(),
         [1, 3, 2], [1, 2, 5], qm, cm),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masks", [False, True])
def test_opcheck_matryoshka_infonce(dtype, masks):
    q, c, hn, qm, cm, hm = inputs(dtype, masks=masks, nc=5)
    for t in (q, c, hn):
        t.requires_grad_()
    labels = torch.tensor([1, 4, 0])
    torch.library.opcheck(
        torch.ops.metaembed.matryoshka_infonce.default,
        (q, c, hn, labels, [1, 3, 2], [1, 2, 5], 2.5, qm, cm, hm),
    )


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 16, 32, generator=gen, requires_grad=True)
    c = torch.randn(6, 64, 32, generator=gen, requires_grad=True)
    hn = torch.randn(6, 1, 64, 32, generator=gen, requires_grad=True)

    def step(q, c, hn):
        scores = maxsim_grouped(q, c, DEFAULT_GROUPS)
        loss = matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, temperature=0.05)
        return loss + 1e-3 * scores.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(q, c, hn)
    eager_grads = torch.autograd.grad(eager, (q, c, hn))
    out = compiled(q, c, hn)
    grads = torch.autograd.grad(out, (q, c, hn))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
    ref = reference.matryoshka_infonce(q.double(), c.double(), DEFAULT_GROUPS, hard_negatives=hn.double(),
                                       temperature=0.05)
    assert abs((out - 1e-3 * maxsim_grouped(q, c, DEFAULT_GROUPS).mean()).item() - ref.item()) < 1e-3


def test_torch_compile_inductor():
    """The default inductor backend too (ops stay opaque calls inside the compiled graph)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 16, 24, generator=gen)
    c = torch.randn(5, 64, 24, generator=gen)
    fn = torch.compile(lambda q, c: maxsim_grouped(q, c, DEFAULT_GROUPS).softmax(-1), fullgraph=True)
    torch.testing.assert_close(fn(q, c), maxsim_grouped(q, c, DEFAULT_GROUPS).softmax(-1))
