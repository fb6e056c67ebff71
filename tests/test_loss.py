"""matryoshka_infonce and MatryoshkaInfoNCELoss against the reference and an independent
formulation in the style of the released MetaEmbed training code."""
import pytest
import torch
import torch.nn.functional as F

from helpers import UNIT_ROUNDOFF, assert_close, cpu_kernel_backends, dtype_id, exact_values, normal_values
from metaembed_kernels import DEFAULT_GROUPS, MatryoshkaInfoNCELoss, matryoshka_infonce, reference

BACKENDS = cpu_kernel_backends() + ["reference"]
SMALL_GROUPS = ((1, 1), (2, 3), (4, 5), (3, 7))


def released_style_loss(q, c, hard_negatives, groups, temperature, weights, labels):
    """One einsum over the full (Rq, Rc) tile of every query against every candidate and
    every hard negative, sliced per group; each query's own hard negatives are picked off
    the diagonal. Deliberately wasteful: it is the independent check."""
    nq, k, rc, d = hard_negatives.shape
    nc = c.shape[0]
    everything = torch.cat([c, hard_negatives.reshape(nq * k, rc, d)])
    sim = torch.einsum("aid,bjd->abij", q, everything)
    losses = []
    for r_q, r_c in groups:
        s = sim[:, :, :r_q, :r_c].max(dim=-1).values.sum(dim=-1)  # (Nq, Nc + Nq*K)
        in_batch = s[:, :nc]
        own = torch.diagonal(s[:, nc:].reshape(nq, nq, k), dim1=0, dim2=1).T  # (Nq, K)
        logits = torch.cat([in_batch, own], dim=1) / temperature
        losses.append(F.cross_entropy(logits, labels))
    losses = torch.stack(losses)
    return (torch.tensor(weights, dtype=losses.dtype) * losses).sum() / len(groups)


def make(nq=6, nc=9, rq=4, rc=7, d=24, k=1, dtype=torch.float32, seed=0, values=normal_values, masks=False):
    gen = torch.Generator().manual_seed(seed)
    q = values((nq, rq, d), gen, dtype)
    c = values((nc, rc, d), gen, dtype)
    hn = values((nq, k, rc, d), gen, dtype)
    labels = torch.randperm(nc, generator=gen)[:nq]
    out = dict(q=q, c=c, hn=hn, labels=labels)
    if masks:
        out["q_mask"] = torch.rand(nq, rq, generator=gen) > 0.3
        out["c_mask"] = torch.rand(nc, rc, generator=gen) > 0.3
        out["hn_mask"] = torch.rand(nq, k, rc, generator=gen) > 0.3
        out["c_mask"][1] = False
        if k:
            out["hn_mask"][0, 0] = False
    return out


def loss_tolerance(x, groups, temperature, weights, reduction, k):
    """Bound on |fp32 loss - fp64 loss| from the reduction lengths.

    Each logit s/T is a sum of r_q maxima of length-D dot products: fp32 error at most
    (D + r_q) u |logit|_abs, where |logit|_abs is the same score computed on |q|, |c| (so
    cancellation cannot hide the bound). A cross-entropy term lse - positive errs by at most
    twice its largest logit error plus u |lse| per log-sum-exp step; the weighted sum over
    groups and queries adds u per term. Summed over the terms it is the tolerance."""
    q, c, hn = x["q"].double().abs(), x["c"].double().abs(), x["hn"].double().abs()
    d, rq = q.shape[2], max(g[0] for g in groups)
    n_logits = c.shape[0] + k
    u = UNIT_ROUNDOFF[torch.float32]
    magnitude = reference.infonce_logits(q, c, groups, temperature, hn if k else None)  # (G, Nq, Nc + K)
    per_term = 2 * (d + rq) * u * magnitude.amax(-1) + 2 * n_logits * u * magnitude.amax(-1)  # (G, Nq)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    total = (w * per_term).sum() / len(groups)
    return float(total / (q.shape[0] if reduction == "mean" else 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_released_style_formulation(backend, k, reduction):
    x = make(k=k, d=24, seed=k)
    weights = (0.5, 1.0, 2.0, 0.25)
    temperature = 0.05
    loss = matryoshka_infonce(
        x["q"], x["c"], SMALL_GROUPS, weights=weights, temperature=temperature,
        hard_negatives=x["hn"] if k else None, labels=x["labels"], reduction=reduction, backend=backend,
    )
    expected = released_style_loss(
        x["q"].double(), x["c"].double(), x["hn"].double(), SMALL_GROUPS, temperature, weights, x["labels"]
    )
    if reduction == "sum":
        expected = expected * x["q"].shape[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    tolerance = loss_tolerance(x, SMALL_GROUPS, temperature, weights, reduction, k)
    assert abs(loss.item() - expected.item()) <= tolerance, (loss.item(), expected.item(), tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "mask"])
def test_forward_and_gradients_match_reference(backend, dtype, k, masks):
    x = make(nq=5, nc=11, rq=5, rc=9, d=20, k=k, dtype=dtype, seed=10 + k, values=exact_values, masks=masks)
    kw = dict(weights=(1.0, 0.5, 2.0, 1.5), temperature=0.5, labels=x["labels"], return_group_losses=True)
    hn = x["hn"] if k else None
    mk = dict(q_mask=x.get("q_mask"), c_mask=x.get("c_mask"), hard_negatives_mask=x.get("hn_mask") if k else None)

    q, c = x["q"].clone().requires_grad_(), x["c"].clone().requires_grad_()
    hn_k = hn.clone().requires_grad_() if k else None
    loss, groups_loss = matryoshka_infonce(q, c, SMALL_GROUPS, hard_negatives=hn_k, backend=backend, **kw, **mk)
    loss.backward()

    qr, cr = x["q"].double().requires_grad_(), x["c"].double().requires_grad_()
    hn_r = hn.double().requires_grad_() if k else None
    loss_r, groups_r = reference.matryoshka_infonce(qr, cr, SMALL_GROUPS, hard_negatives=hn_r, **kw, **mk)
    loss_r.backward()

    # Exact inputs: scores are exact in fp32; only exp/log and the gradient sums round.
    assert_close(groups_loss, groups_r, 1e-5 * (1 + groups_r.abs()), "group losses")
    assert_close(loss, loss_r, 1e-5 * (1 + loss_r.abs()), "loss")
    # Rounding to `dtype` of the result and, for the reference backend, of the partial
    # gradients autograd sums in `dtype` (in-batch + hard-negative paths): scale with max|g|.
    u = UNIT_ROUNDOFF[dtype]
    for name, got, ref in [("dq", q.grad, qr.grad), ("dc", c.grad, cr.grad)] + (
        [("dhn", hn_k.grad, hn_r.grad)] if k else []
    ):
        assert got.dtype == dtype
        tol = 4 * u * ref.abs() + (2 * u if dtype != torch.float32 else 1e-5) * ref.abs().max() + 1e-7
        assert_close(got, ref, tol, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_weights_and_labels_matter(backend):
    x = make(seed=3)
    base = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, labels=x["labels"], backend=backend)
    hotter = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, labels=x["labels"], temperature=0.3, backend=backend)
    weighted = matryoshka_infonce(
        x["q"], x["c"], SMALL_GROUPS, labels=x["labels"], weights=(1, 0, 0, 0), backend=backend
    )
    _, per_group = matryoshka_infonce(
        x["q"], x["c"], SMALL_GROUPS, labels=x["labels"], return_group_losses=True, backend=backend
    )
    default_labels = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, backend=backend)
    arange_labels = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, labels=torch.arange(6), backend=backend)
    assert not torch.isclose(base, hotter)
    assert torch.allclose(weighted, per_group[0] / 4, rtol=1e-6)
    assert torch.allclose(base, per_group.mean(), rtol=1e-6)
    assert torch.equal(default_labels, arange_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_groups_and_module(backend):
    gen = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(8, 16, 32, generator=gen), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(8, 64, 32, generator=gen), dim=-1)
    hn = torch.nn.functional.normalize(torch.randn(8, 1, 64, 32, generator=gen), dim=-1)
    module = MatryoshkaInfoNCELoss(backend=backend)
    loss = module(q, c, hn)
    expected = reference.matryoshka_infonce(q.double(), c.double(), DEFAULT_GROUPS, hard_negatives=hn.double())
    assert abs(loss.item() - expected.item()) < 1e-4
    assert "groups=((1, 1), (2, 4)" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_negatives_are_per_query(backend):
    """Query a's loss must not change when another query's hard negatives change."""
    x = make(nq=4, k=2, seed=8)
    kw = dict(labels=x["labels"], reduction="sum", backend=backend)
    hn2 = x["hn"].clone()
    hn2[1:] = torch.randn_like(hn2[1:])
    l0 = matryoshka_infonce(x["q"][:1], x["c"], SMALL_GROUPS, hard_negatives=x["hn"][:1], **{**kw, "labels": x["labels"][:1]})
    full = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, hard_negatives=x["hn"], **kw)
    full2 = matryoshka_infonce(x["q"], x["c"], SMALL_GROUPS, hard_negatives=hn2, **kw)
    rest = matryoshka_infonce(x["q"][1:], x["c"], SMALL_GROUPS, hard_negatives=x["hn"][1:], **{**kw, "labels": x["labels"][1:]})
    rest2 = matryoshka_infonce(x["q"][1:], x["c"], SMALL_GROUPS, hard_negatives=hn2[1:], **{**kw, "labels": x["labels"][1:]})
    assert torch.allclose(full - rest, l0, atol=1e-4) and torch.allclose(full2 - rest2, l0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_batch(backend):
    q = torch.randn(0, 4, 8, requires_grad=True)
    c = torch.randn(5, 6, 8, requires_grad=True)
    loss = matryoshka_infonce(q, c, ((2, 3),), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(c.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """temperature 0.01 with unnormalised inputs: logits in the thousands; the online
    log-sum-exp must not overflow."""
    x = make(seed=12)
    q, c = (x["q"] * 4).requires_grad_(), (x["c"] * 4).requires_grad_()
    loss = matryoshka_infonce(q, c, SMALL_GROUPS, temperature=0.01, labels=x["labels"], backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()
