"""maxsim_paired_grouped / maxsim_paired (each query against its own candidates): every kernel
backend available here against the float64 reference, over the awkward-shape sweep."""
import random

import pytest
import torch

from helpers import (
    DTYPES,
    Case,
    assert_close,
    cpu_kernel_backends,
    dtype_id,
    exact_values,
    grad_tolerance,
    normal_values,
    random_groups,
    score_tolerance,
    sweep_cases,
)
from metaembed_kernels import maxsim_grouped, maxsim_paired, maxsim_paired_grouped, reference

# The Triton interpreter is ~1000x slower than compiled code: it gets every third case.
PARITY = [
    pytest.param(backend, case, id=f"{backend}-{case}")
    for backend in cpu_kernel_backends() + ["reference"]
    for k, case in enumerate(sweep_cases())
    if backend not in ("triton", "reference") or k % 3 == 0
]


def make_inputs(case, dtype, values):
    """B = case.nq queries, each with N = min(case.nc, 5) own candidates; the masks have
    ~35% invalid tokens, a fully masked query, a fully masked candidate and a candidate whose
    only valid token is its last (short prefixes see none)."""
    gen = torch.Generator().manual_seed(case.seed)
    n = min(case.nc, 5)
    q = values((case.nq, case.rq, case.d), gen, dtype)
    c = values((case.nq, n, case.rc, case.d), gen, dtype)
    q_mask = c_mask = None
    if case.masked:
        q_mask = torch.rand(case.nq, case.rq, generator=gen) > 0.35
        c_mask = torch.rand(case.nq, n, case.rc, generator=gen) > 0.35
        q_mask[case.nq // 2] = False
        c_mask[0, n // 2] = False
        c_mask[-1, 0] = False
        c_mask[-1, 0, -1] = True
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    return q, c, q_mask, c_mask, groups


def check_scores(q, c, q_mask, c_mask, groups, backend, label):
    """The op's scores against the float64 reference, at row b's in-batch tolerance against
    its own candidates; returns them."""
    out = maxsim_paired_grouped(q, c, groups, q_mask=q_mask, c_mask=c_mask, backend=backend)
    expected = reference.maxsim_grouped_paired(q.double(), c.double(), groups, q_mask, c_mask)
    tol = torch.stack([score_tolerance(q[b:b + 1], c[b], groups)[:, 0] for b in range(c.shape[0])], dim=1)
    assert_close(out, expected, tol, f"{label} paired scores {groups}")
    return out


def check_gradients(q, c, q_mask, c_mask, groups, dtype, backend, label, seed):
    """dq and dc of a random upstream gradient against the float64 reference; returns the
    op's leaf tensors (their .grad filled)."""
    grad = torch.randn(len(groups), c.shape[0], c.shape[1], generator=torch.Generator().manual_seed(seed))
    q_k, c_k = q.clone().requires_grad_(), c.clone().requires_grad_()
    maxsim_paired_grouped(q_k, c_k, groups, q_mask=q_mask, c_mask=c_mask, backend=backend).backward(grad)
    q_r, c_r = q.double().requires_grad_(), c.double().requires_grad_()
    reference.maxsim_grouped_paired(q_r, c_r, groups, q_mask, c_mask).backward(grad.double())
    g_abs = torch.tensor(grad.abs().max().item())
    assert_close(q_k.grad, q_r.grad, grad_tolerance(q_r.grad, dtype, c.shape[1] * len(groups), g_abs), f"{label} dq")
    assert_close(c_k.grad, c_r.grad, grad_tolerance(c_r.grad, dtype, q.shape[1] * len(groups), g_abs), f"{label} dc")
    return q_k, c_k


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,case", PARITY)
def test_forward_matches_reference(backend, case, dtype):
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, normal_values)
    out = check_scores(q, c, q_mask, c_mask, groups, backend, backend)
    assert out.dtype == torch.float32 and out.shape == (len(groups), c.shape[0], c.shape[1])
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,case", PARITY)
def test_backward_matches_reference(backend, case, dtype):
    # Exact-arithmetic inputs: argmax decisions (ties included) are the same everywhere.
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    q_k, c_k = check_gradients(q, c, q_mask, c_mask, groups, dtype, backend, backend, seed=case.seed + 1)
    assert q_k.grad.dtype == dtype and c_k.grad.dtype == dtype
    if q_mask is not None:
        assert (q_k.grad[~q_mask] == 0).all() and (c_k.grad[~c_mask] == 0).all()


@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["reference"])
def test_paired_equals_the_diagonal_of_in_batch_scores(backend):
    """N = 1: aligned pairs; the paired op equals the diagonal of maxsim_grouped, bitwise
    on exact values (same sums, same order of a query's tokens)."""
    gen = torch.Generator().manual_seed(11)
    q = exact_values((7, 16, 40), gen)
    c = exact_values((7, 64, 40), gen)
    groups = ((1, 1), (2, 4), (16, 64))
    paired = maxsim_paired_grouped(q, c[:, None], groups, backend=backend)[:, :, 0]
    in_batch = maxsim_grouped(q, c, groups, backend=backend)
    assert torch.equal(paired, torch.diagonal(in_batch, dim1=1, dim2=2))
    assert torch.equal(maxsim_paired(q, c[:, None], backend=backend), paired[-1][:, None])


@pytest.mark.parametrize("backend", cpu_kernel_backends() + ["reference"])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty_batches(backend, shape):
    b, n = shape
    q = torch.randn(b, 4, 8, requires_grad=True)
    c = torch.randn(b, n, 6, 8, requires_grad=True)
    out = maxsim_paired_grouped(q, c, ((1, 1), (4, 6)), backend=backend)
    assert out.shape == (2, b, n)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(c.grad, torch.zeros_like(c))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rq", [20, 33])
def test_every_isa_packs_each_query(cpu_isa, rq, dtype):
    """Each query is packed alone into query panels (one partly filled panel at r_q = 20; two
    or three at 33 on AVX-512 / AVX2), from a strided view, with an odd D: forward and
    gradients on every instruction set the CPU backend can run here."""
    case = Case(5, 4, rq, 11, 37, masked=True, seed=rq)
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    q = torch.cat([q, q.flip(1)], dim=1)[:, ::2]  # strides (2 rq D, 2 D, 1): read in place, not copied
    assert q.stride() == (2 * rq * 37, 2 * 37, 1)
    check_scores(q, c, q_mask, c_mask, groups, "cpu", cpu_isa)
    check_gradients(q, c, q_mask, c_mask, groups, dtype, "cpu", cpu_isa, seed=rq)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rq,rc,d", [(16, 64, 128), (16, 25, 300), (9, 33, 200), (16, 17, 64), (12, 40, 513)])
def test_every_isa_queries_of_16_tokens_or_fewer(cpu_isa, rq, rc, d, dtype):
    """Queries of <= 16 tokens take the 16 x 16 tile on AVX-512 (one query register against 16
    candidate rows at a fixed stride of 64, 128, 256 or 512 floats): full and zero-padded tiles,
    the lone last row of r_c = 8 m + 1 (25, 17, 33), D = 513 past the widest stride (the 8 x 32
    tile), float rows read in place at D = 64 and 128 and copied when strided: forward and
    gradients on every instruction set here."""
    case = Case(4, 3, rq, rc, d, masked=True, seed=rq + rc)
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    check_scores(q, c, q_mask, c_mask, groups, "cpu", cpu_isa)
    check_gradients(q, c, q_mask, c_mask, groups, dtype, "cpu", cpu_isa, seed=rq)
    strided = torch.cat([c, c], dim=-1)[..., :d]  # row stride 2 D: never the tile's stride
    check_scores(q, strided, q_mask, c_mask, groups, "cpu", f"{cpu_isa} strided")
