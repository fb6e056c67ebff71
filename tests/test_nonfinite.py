"""Non-finite values follow torch's rules on every backend, forward and backward.

* NaN in a valid token reaches every score, loss and gradient that reads it (a NaN
  similarity is the maximum, its lowest index the argmax), exactly where the float64
  reference (autograd over torch.amax / argmax semantics) has NaN.
* -inf similarities are ordinary values: a prefix whose valid similarities are all -inf
  scores -inf, not 0 (validity comes from the masks).
* NaN / inf in masked tokens is never read: results equal those with zeros there, and the
  masked tokens' gradients are exactly 0.
"""
import pytest
import torch

from helpers import exact_values, op_backends
from metaembed_kernels import matryoshka_infonce, maxsim_grouped, maxsim_paired_grouped, reference

GROUPS = ((1, 1), (2, 3), (4, 5), (3, 2))
NAN, INF = float("nan"), float("inf")


def _base(seed=0, nq=3, nc=4, rq=4, rc=5, d=7):
    g = torch.Generator().manual_seed(seed)
    return exact_values((nq, rq, d), g), exact_values((nc, rc, d), g), exact_values((nq, 2, rc, d), g)


def assert_same_values(actual, expected, name):
    """Same NaN positions, same infinities, finite values equal up to fp32 rounding."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, name
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {nan_a.nonzero().tolist()}, expected {nan_e.nonzero().tolist()}"
    inf_a, inf_e = actual.isinf(), expected.isinf()
    assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), f"{name}: infinities differ"
    finite = ~(nan_e | inf_e)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-5, msg=name)


def _scores_and_grads(fn, q, c, backend):
    q = q.clone().requires_grad_()
    c = c.clone().requires_grad_()
    out = fn(q, c, backend)
    weights = torch.arange(1, out.numel() + 1, dtype=out.dtype).view(out.shape) / out.numel()
    dq, dc = torch.autograd.grad((out * weights).sum(), (q, c))
    return out, dq, dc


def _grouped(q, c, backend, q_mask=None, c_mask=None):
    if backend == "oracle":
        return reference.maxsim_grouped(q.double(), c.double(), GROUPS, q_mask, c_mask)
    return maxsim_grouped(q, c, GROUPS, q_mask=q_mask, c_mask=c_mask, backend=backend)


def _paired(q, c, backend, q_mask=None, c_mask=None):
    if backend == "oracle":
        return reference.maxsim_grouped_paired(q.double(), c.double(), GROUPS, q_mask, c_mask)
    return maxsim_paired_grouped(q, c, GROUPS, q_mask=q_mask, c_mask=c_mask, backend=backend)


def _check_against_oracle(fn, q, c, backend, name):
    got = _scores_and_grads(fn, q, c, backend)
    want = _scores_and_grads(fn, q, c, "oracle")
    for part, a, e in zip(("scores", "dq", "dc"), got, want):
        assert_same_values(a, e, f"{name} {part}")
    return got


@pytest.mark.parametrize("backend", op_backends())
@pytest.mark.parametrize("where", ["query", "candidate", "late candidate"])
def test_nan_in_a_valid_token_propagates(backend, where):
    q, c, hn = _base()
    if where == "query":
        q[1, 2, 3] = NAN  # query 1, token 2: groups with r_q > 2
    elif where == "candidate":
        c[2, 1, 0] = NAN  # candidate 2, token 1: groups with r_c > 1, every query
    else:
        c[0, 4, 6] = NAN  # only the (4, 5) group reads token 4
    scores, dq, dc = _check_against_oracle(_grouped, q, c, backend, where)
    assert scores.isnan().any() and not scores.isnan().all()
    cp = torch.stack([c[:2], c[1:3], c[2:4]])  # (3, 2, 5, 7): each query its own pair
    _check_against_oracle(_paired, q, cp, backend, where + " paired")


@pytest.mark.parametrize("backend", op_backends())
def test_negative_infinite_similarities_score_minus_infinity(backend):
    """q = 1e20, c = -1e20: every product overflows to -inf in fp32 (the original report)."""
    q = torch.full((2, 3, 4), 1e20)
    c = torch.full((3, 5, 4), -1e20)
    c[1] = exact_values((5, 4), torch.Generator().manual_seed(1))  # one ordinary candidate
    scores = maxsim_grouped(q, c, ((1, 1), (3, 5)), backend=backend)
    expected = reference.maxsim_grouped(q, c, ((1, 1), (3, 5)))
    assert torch.isneginf(expected[:, :, 0]).all()
    assert_same_values(scores, expected, "scores")
    # a valid token whose similarity is -inf still beats a masked one, and gets the gradient
    c_mask = torch.ones(3, 5, dtype=torch.bool)
    c_mask[0, 0] = False
    groups = ((1, 1), (2, 2), (3, 5))
    masked = lambda q, c, b: (reference.maxsim_grouped(q.float(), c.float(), groups, None, c_mask)  # noqa: E731
                              if b == "oracle" else maxsim_grouped(q, c, groups, c_mask=c_mask, backend=b))
    _check_against_oracle(masked, q, c, backend, "-inf masked")


@pytest.mark.parametrize("backend", op_backends())
def test_non_finite_values_in_masked_tokens_are_never_read(backend):
    q, c, hn = _base(seed=3)
    g = torch.Generator().manual_seed(4)
    q_mask = torch.rand(q.shape[:2], generator=g) > 0.3
    c_mask = torch.rand(c.shape[:2], generator=g) > 0.3
    q_mask[:, 0] = True
    poison = torch.tensor([NAN, INF, -INF])
    q_bad, c_bad = q.clone(), c.clone()
    q_bad[~q_mask] = poison[torch.arange(int((~q_mask).sum())) % 3].unsqueeze(-1).expand(-1, q.shape[-1])
    c_bad[~c_mask] = poison[torch.arange(int((~c_mask).sum())) % 3].unsqueeze(-1).expand(-1, c.shape[-1])
    clean = _scores_and_grads(lambda q, c, b: _grouped(q, c, b, q_mask, c_mask), q, c, backend)
    dirty = _scores_and_grads(lambda q, c, b: _grouped(q, c, b, q_mask, c_mask), q_bad, c_bad, backend)
    for part, a, e in zip(("scores", "dq", "dc"), dirty, clean):
        assert torch.isfinite(a).all(), f"{part}: a masked non-finite value was read"
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=part)
    assert (dirty[1][~q_mask] == 0).all() and (dirty[2][~c_mask] == 0).all()
    # the loss and its hard negatives too
    hn_mask = torch.rand(hn.shape[:3], generator=g) > 0.3
    hn_bad = hn.clone()
    hn_bad[~hn_mask] = NAN

    def loss(q, c, hn):
        q, c, hn = (t.clone().requires_grad_() for t in (q, c, hn))
        value = matryoshka_infonce(q, c, GROUPS, hard_negatives=hn, hard_negatives_mask=hn_mask, q_mask=q_mask,
                                   c_mask=c_mask, temperature=0.5, backend=backend)
        return (value, *torch.autograd.grad(value, (q, c, hn)))

    for part, a, e in zip(("loss", "dq", "dc", "dhn"), loss(q_bad, c_bad, hn_bad), loss(q, c, hn)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=part)


@pytest.mark.parametrize("backend", op_backends())
def test_nan_reaches_the_loss_and_its_gradients(backend):
    """A NaN query makes the loss NaN (a diverging run must not report a finite loss)."""
    q, c, hn = _base(seed=5)
    q[0] = NAN

    def run(fn_backend):
        qq, cc, hh = (t.clone().double() if fn_backend == "oracle" else t.clone() for t in (q, c, hn))
        qq.requires_grad_()
        cc.requires_grad_()
        hh.requires_grad_()
        if fn_backend == "oracle":
            value = reference.matryoshka_infonce(qq, cc, GROUPS, hard_negatives=hh, temperature=0.5)
        else:
            value = matryoshka_infonce(qq, cc, GROUPS, hard_negatives=hh, temperature=0.5, backend=fn_backend)
        return (value, *torch.autograd.grad(value, (qq, cc, hh)))

    got, want = run(backend), run("oracle")
    assert got[0].isnan()
    for part, a, e in zip(("loss", "dq", "dc", "dhn"), got, want):
        assert_same_values(a, e, part)


@pytest.mark.parametrize("backend", op_backends())
def test_infinite_logits_follow_logsumexp(backend):
    """A candidate whose scores are -inf adds nothing to the softmax; one at +inf takes it."""
    q, c, hn = _base(seed=6)
    q = q.abs() + 0.25
    c[3] = -1e20  # every similarity with candidate 3 is -inf: logit -inf for every query
    labels = torch.tensor([0, 1, 2])
    for t in (q, c):
        t.requires_grad_()
    got = matryoshka_infonce(q, c, GROUPS, labels=labels, temperature=0.5, backend=backend,
                             return_group_losses=True)
    want = reference.matryoshka_infonce(q.double(), c.double(), GROUPS, labels=labels, temperature=0.5,
                                        return_group_losses=True)
    assert torch.isfinite(want[1]).all()
    assert_same_values(got[1], want[1], "group losses")
