"""maxsim_grouped / maxsim: every kernel backend available here against the float64 reference."""
import random

import pytest
import torch

from helpers import (
    DTYPES,
    UNIT_ROUNDOFF,
    assert_close,
    cpu_kernel_backends,
    dtype_id,
    exact_values,
    grad_tolerance,
    normal_values,
    random_groups,
    random_masks,
    score_tolerance,
    sweep_cases,
)
from metaembed_kernels import DEFAULT_GROUPS, maxsim, maxsim_grouped, reference

# The Triton interpreter is ~1000x slower than compiled code: it gets every third case.
PARITY = [
    pytest.param(backend, case, id=f"{backend}-{case}")
    for backend in cpu_kernel_backends()
    for k, case in enumerate(sweep_cases())
    if backend != "triton" or k % 3 == 0
]


def make_inputs(case, dtype, values):
    gen = torch.Generator().manual_seed(case.seed)
    q = values((case.nq, case.rq, case.d), gen, dtype)
    c = values((case.nc, case.rc, case.d), gen, dtype)
    q_mask, c_mask = random_masks(case.nq, case.rq, case.nc, case.rc, gen) if case.masked else (None, None)
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    return q, c, q_mask, c_mask, groups


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,case", PARITY)
def test_forward_matches_reference(backend, case, dtype):
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, normal_values)
    out = maxsim_grouped(q, c, groups, q_mask=q_mask, c_mask=c_mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (len(groups), case.nq, case.nc)
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out, expected, score_tolerance(q, c, groups), f"{backend} scores {groups}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,case", PARITY)
def test_backward_matches_reference(backend, case, dtype):
    # Exact-arithmetic inputs: argmax decisions (ties included) are the same everywhere, so
    # the gradients must agree up to fp32 accumulation and the final rounding to `dtype`.
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    gen = torch.Generator().manual_seed(case.seed + 1)
    grad = torch.randn(len(groups), case.nq, case.nc, generator=gen)

    q_k, c_k = q.clone().requires_grad_(), c.clone().requires_grad_()
    maxsim_grouped(q_k, c_k, groups, q_mask=q_mask, c_mask=c_mask, backend=backend).backward(grad)
    q_r, c_r = q.double().requires_grad_(), c.double().requires_grad_()
    reference.maxsim_grouped(q_r, c_r, groups, q_mask, c_mask).backward(grad.double())

    assert q_k.grad.dtype == dtype and c_k.grad.dtype == dtype
    g_abs = grad.abs().max().item()
    tol_q = grad_tolerance(q_r.grad, dtype, case.nc * len(groups), torch.tensor(g_abs))
    tol_c = grad_tolerance(c_r.grad, dtype, case.nq * case.rq * len(groups), torch.tensor(g_abs))
    assert_close(q_k.grad, q_r.grad, tol_q, f"{backend} dq")
    assert_close(c_k.grad, c_r.grad, tol_c, f"{backend} dc")
    if q_mask is not None:  # masked tokens get exactly zero gradient, not merely a small one
        assert (q_k.grad[~q_mask] == 0).all(), f"{backend}: masked query tokens got a gradient"
    if c_mask is not None:
        assert (c_k.grad[~c_mask] == 0).all(), f"{backend}: masked candidate tokens got a gradient"


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_ties_send_gradient_to_lowest_index(backend):
    q = torch.ones(2, 3, 8)
    c = torch.zeros(4, 6, 8)
    c[:, 1] = 1.0  # tokens 1, 3 and 4 tie for the max; 1 must get all the gradient
    c[:, 3] = 1.0
    c[:, 4] = 1.0
    c.requires_grad_()
    maxsim_grouped(q, c, ((3, 6), (1, 2)), backend=backend).sum().backward()
    expected = torch.zeros_like(c)
    expected[:, 1] = 2 * (3 + 1)  # 2 queries x (3 tokens in group 0 + 1 token in group 1)
    assert torch.equal(c.grad, expected)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_masked_tokens_never_win_and_get_no_gradient(backend):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 16, generator=gen)
    c = torch.randn(5, 8, 16, generator=gen)
    c_mask = torch.ones(5, 8, dtype=torch.bool)
    c_mask[:, 2] = False
    c_big = c.clone()
    c_big[:, 2] = 1e4 * q[0, 0]  # would win every max if it were not masked
    q_mask = torch.tensor([[True, False, True, True]] * 3)
    c_big.requires_grad_()
    q_req = q.clone().requires_grad_()
    out = maxsim_grouped(q_req, c_big, DEFAULT_GROUPS[:3], q_mask=q_mask, c_mask=c_mask, backend=backend)
    ref = reference.maxsim_grouped(q.double(), c.double(), DEFAULT_GROUPS[:3], q_mask, c_mask)
    assert_close(out, ref, score_tolerance(q, c, DEFAULT_GROUPS[:3]), "masked scores")
    out.sum().backward()
    assert torch.all(c_big.grad[:, 2] == 0) and torch.all(q_req.grad[:, 1] == 0)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_prefix_without_valid_candidate_token_contributes_zero(backend):
    q = torch.ones(1, 2, 4)
    c = -torch.ones(1, 4, 4)  # all dots are -4
    c_mask = torch.tensor([[False, False, True, True]])
    out = maxsim_grouped(q, c, ((2, 1), (2, 2), (2, 3), (1, 4)), c_mask=c_mask, backend=backend)
    assert out.flatten().tolist() == [0.0, 0.0, -8.0, -4.0]


@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["reference"])
def test_maxsim_is_the_full_budget_group(backend):
    gen = torch.Generator().manual_seed(0)
    q, c = torch.randn(4, 5, 24, generator=gen), torch.randn(6, 7, 24, generator=gen)
    full = maxsim_grouped(q, c, ((5, 7),), backend=backend)[0]
    assert torch.equal(maxsim(q, c, backend=backend), full)
    assert torch.equal(maxsim_grouped(q, c, backend=backend)[0], full)


@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["reference"])
def test_group_order_is_preserved(backend):
    gen = torch.Generator().manual_seed(1)
    q, c = torch.randn(3, 16, 32, generator=gen), torch.randn(5, 64, 32, generator=gen)
    groups = list(DEFAULT_GROUPS)
    out = maxsim_grouped(q, c, groups, backend=backend)
    perm = [3, 0, 4, 2, 1, 3]  # shuffled, with a repeat
    out_perm = maxsim_grouped(q, c, [groups[k] for k in perm], backend=backend)
    assert torch.equal(out_perm, out[perm])


@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["reference"])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_batches_return_empty_results(backend, shape):
    nq, nc = shape
    q = torch.randn(nq, 4, 8, requires_grad=True)
    c = torch.randn(nc, 6, 8, requires_grad=True)
    out = maxsim_grouped(q, c, ((1, 1), (4, 6)), backend=backend)
    assert out.shape == (2, nq, nc) and out.dtype == torch.float32
    out.sum().backward()
    # nothing to score: exactly zero gradients of the inputs' shapes
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(c.grad, torch.zeros_like(c))


def test_reference_matches_brute_force_loops():
    """The oracle itself, against the definition written as plain loops."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    c = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64)
    q_mask, c_mask = random_masks(3, 5, 4, 7, gen)
    groups = ((2, 3), (5, 7), (1, 1), (4, 2))
    out = reference.maxsim_grouped(q, c, groups, q_mask, c_mask)
    for g, (rq, rc) in enumerate(groups):
        for a in range(3):
            for b in range(4):
                total = 0.0
                for i in range(rq):
                    if not q_mask[a, i]:
                        continue
                    dots = [float(q[a, i] @ c[b, j]) for j in range(rc) if c_mask[b, j]]
                    total += max(dots) if dots else 0.0
                assert abs(out[g, a, b].item() - total) < 1e-12


def test_fp32_tolerance_is_tight_enough_to_catch_a_wrong_token():
    """Guard on the tolerance itself: dropping one query token must exceed it."""
    gen = torch.Generator().manual_seed(5)
    q, c = torch.randn(2, 5, 24, generator=gen), torch.randn(3, 7, 24, generator=gen)
    groups = ((5, 7),)
    full = reference.maxsim_grouped(q.double(), c.double(), groups)
    dropped = reference.maxsim_grouped(q[:, :4].double(), c.double(), ((4, 7),))
    tol = score_tolerance(q, c, groups)
    assert torch.all((full - dropped).abs() > tol)
    assert tol.max() < 1e-3 * full.abs().max() + 1e-3
    assert UNIT_ROUNDOFF[torch.float32] < 1e-7
