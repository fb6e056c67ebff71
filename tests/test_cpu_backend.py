"""CPU C++ backend specifics: every ISA path, blocking edge cases, threads, strides,
determinism, 64-bit offsets and the memory bound."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import (
    DTYPES,
    assert_close,
    dtype_id,
    exact_values,
    grad_tolerance,
    normal_values,
    ops_of,
    requires_extension,
    score_tolerance,
)
from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped, maxsim_paired_grouped, reference

pytestmark = requires_extension

# Shapes that reach the engine's blocking paths the small sweep does not:
#  * D > 768 is processed in several D chunks (partial tiles spill and reload);
#  * Nq * Rq beyond one query block (several packed blocks, panels spanning queries);
#  * Rc not a multiple of the register tile, Rq not a multiple of the panel width;
#  * query blocks of <= 4 tokens (dot products along D instead of the micro-kernel), with
#    D chunks and D tails, and the first block size past them (5 tokens: micro-kernel).
BLOCKING_SHAPES = [
    dict(nq=3, nc=5, rq=16, rc=64, d=1000),
    dict(nq=41, nc=6, rq=16, rc=64, d=128),
    dict(nq=70, nc=3, rq=5, rc=13, d=33),
    dict(nq=2, nc=9, rq=17, rc=65, d=777),
    dict(nq=1, nc=37, rq=1, rc=3, d=1000),
    dict(nq=2, nc=11, rq=2, rc=5, d=70),
    dict(nq=5, nc=6, rq=1, rc=9, d=35),
]


def check_forward_backward(shape, dtype, backend="cpu", masks=True, groups=DEFAULT_GROUPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nq, nc, rq, rc, d = (shape[k] for k in ("nq", "nc", "rq", "rc", "d"))
    groups = tuple((min(a, rq), min(b, rc)) for a, b in groups)
    q = normal_values((nq, rq, d), gen, dtype)
    c = normal_values((nc, rc, d), gen, dtype)
    qm = (torch.rand(nq, rq, generator=gen) > 0.2) if masks else None
    cm = (torch.rand(nc, rc, generator=gen) > 0.2) if masks else None
    out = maxsim_grouped(q, c, groups, q_mask=qm, c_mask=cm, backend=backend)
    ref = reference.maxsim_grouped(q.double(), c.double(), groups, qm, cm)
    assert_close(out, ref, score_tolerance(q, c, groups), f"scores {shape}")

    qe, ce = exact_values((nq, rq, d), gen, dtype), exact_values((nc, rc, d), gen, dtype)
    grad = torch.randn(len(groups), nq, nc, generator=gen)
    qk, ck = qe.clone().requires_grad_(), ce.clone().requires_grad_()
    maxsim_grouped(qk, ck, groups, q_mask=qm, c_mask=cm, backend=backend).backward(grad)
    qr, cr = qe.double().requires_grad_(), ce.double().requires_grad_()
    reference.maxsim_grouped(qr, cr, groups, qm, cm).backward(grad.double())
    gmax = torch.tensor(grad.abs().max().item())
    assert_close(qk.grad, qr.grad, grad_tolerance(qr.grad, dtype, nc * len(groups), gmax), "dq")
    assert_close(ck.grad, cr.grad, grad_tolerance(cr.grad, dtype, nq * rq * len(groups), gmax), "dc")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", BLOCKING_SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_every_isa_on_blocking_edge_cases(cpu_isa, shape, dtype):
    check_forward_backward(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_isa_fused_loss(cpu_isa, dtype):
    gen = torch.Generator().manual_seed(1)
    q, c = exact_values((9, 16, 40), gen, dtype), exact_values((11, 64, 40), gen, dtype)
    hn = exact_values((9, 2, 64, 40), gen, dtype)
    labels = torch.randperm(11, generator=gen)[:9]
    tensors = [t.clone().requires_grad_() for t in (q, c, hn)]
    loss = matryoshka_infonce(*tensors[:2], DEFAULT_GROUPS, hard_negatives=tensors[2], labels=labels,
                              temperature=0.5, backend="cpu")
    loss.backward()
    refs = [t.double().requires_grad_() for t in (q, c, hn)]
    loss_r = reference.matryoshka_infonce(*refs[:2], DEFAULT_GROUPS, hard_negatives=refs[2], labels=labels,
                                          temperature=0.5)
    loss_r.backward()
    assert abs(loss.item() - loss_r.item()) < 1e-5 * (1 + abs(loss_r.item()))
    for t, r in zip(tensors, refs):
        assert_close(t.grad, r.grad, 4 * 2.0**-8 * r.grad.abs() + 1e-5 * r.grad.abs().max(), "loss grads")


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(num_threads, threads):
    torch.set_num_threads(threads)
    check_forward_backward(dict(nq=7, nc=23, rq=16, rc=64, d=48), torch.float32)


def test_forward_is_bitwise_identical_across_thread_counts_and_backward_is_deterministic(num_threads):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(13, 16, 64, generator=gen, requires_grad=True)
    c = torch.randn(31, 64, 64, generator=gen, requires_grad=True)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs = []
        for _ in range(2):
            q.grad = c.grad = None
            out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cpu")
            out.backward(torch.ones_like(out))
            runs.append((out.detach().clone(), q.grad.clone(), c.grad.clone()))
        for a, b in zip(*runs):
            assert torch.equal(a, b), "backward not run-to-run deterministic"
        results[threads] = runs[0]
    assert torch.equal(results[1][0], results[2][0])  # forward: same order in every thread
    assert torch.equal(results[1][2], results[2][2])  # dc: owned by one chunk, same order
    torch.testing.assert_close(results[1][1], results[2][1])  # dq: chunk sums differ in order


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_and_sliced_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    # Exact values (multiples of 1/4): every dot product is exact in fp32, so argmax decisions
    # (ties included) are identical here and in the fp64 reference, and gradients compare tightly.
    q_base = exact_values((5, 20, 48), gen, dtype)
    c_base = exact_values((64, 9, 48), gen, dtype)
    cases = {
        "token-slice": (q_base[:, 2:18], c_base.transpose(0, 1)[:, :7]),  # strided token / item dims
        "strided-d": (q_base[:, :16, ::2], c_base.transpose(0, 1)[:, :, 1::2]),  # D not contiguous: copied
        "every-other-item": (q_base[::2, :16], c_base.transpose(0, 1)[::2]),
    }
    for name, (q, c) in cases.items():
        assert not q.is_contiguous() and not c.is_contiguous()
        qm = (torch.rand(q.shape[0], 2 * q.shape[1], generator=gen) > 0.3)[:, ::2]  # strided mask
        cm = (torch.rand(c.shape[0], c.shape[1], generator=gen) > 0.3).t().contiguous().t()
        groups = ((1, 1), (q.shape[1], c.shape[1]), (3, 5))
        out = maxsim_grouped(q, c, groups, q_mask=qm, c_mask=cm, backend="cpu")
        ref = reference.maxsim_grouped(q.double(), c.double(), groups, qm, cm)
        assert_close(out, ref, score_tolerance(q, c, groups), name)
        qg, cg = q.detach().requires_grad_(), c.detach().requires_grad_()
        maxsim_grouped(qg, cg, groups, q_mask=qm, c_mask=cm, backend="cpu").sum().backward()
        qr, cr = q.double().requires_grad_(), c.double().requires_grad_()
        reference.maxsim_grouped(qr, cr, groups, qm, cm).sum().backward()
        n_terms = c.shape[0] * len(groups)  # dq[a, i] sums one selected row per candidate and group
        assert_close(qg.grad, qr.grad, grad_tolerance(qr.grad, dtype, n_terms, torch.tensor(1.0)), f"{name} dq")
        n_terms = q.shape[0] * q.shape[1] * len(groups)  # dc[b, j] sums over every query token and group
        assert_close(cg.grad, cr.grad, grad_tolerance(cr.grad, dtype, n_terms, torch.tensor(1.0)), f"{name} dc")
        assert (qg.grad[~qm] == 0).all() and (cg.grad[~cm] == 0).all(), f"{name}: masked gradients must be 0"


def test_hard_negatives_with_strides():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(4, 16, 32, generator=gen)
    c = torch.randn(6, 64, 32, generator=gen)
    hn_base = torch.randn(4, 64, 3, 32, generator=gen)
    hn = hn_base.transpose(1, 2)  # (4, 3, 64, 32), token stride != D
    hm = (torch.rand(4, 64, 3, generator=gen) > 0.3).transpose(1, 2)
    got = matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, hard_negatives_mask=hm, backend="cpu")
    ref = reference.matryoshka_infonce(q.double(), c.double(), DEFAULT_GROUPS, hard_negatives=hn.double(),
                                       hard_negatives_mask=hm)
    assert abs(got.item() - ref.item()) < 1e-4


def test_memory_stays_small_for_a_large_forward():
    """Acceptance: peak RSS growth of a fresh process during maxsim_grouped (Nq=64, Nc=20000,
    Rq=16, Rc=64, D=128, fp32) stays under 300 MB (the reference einsum needs ~5 GB)."""
    code = textwrap.dedent(
        """
        import torch, metaembed_kernels as mk
        def rss_kb(field):
            for line in open('/proc/self/status'):
                if line.startswith(field):
                    return int(line.split()[1])
        q = torch.randn(64, 16, 128); c = torch.randn(20000, 64, 128)
        mk.maxsim_grouped(q[:2], c[:2], mk.DEFAULT_GROUPS, backend='cpu')  # warm up lazy init
        open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
        before = rss_kb('VmRSS')
        out = mk.maxsim_grouped(q, c, mk.DEFAULT_GROUPS, backend='cpu')
        print((rss_kb('VmHWM') - before) / 1024)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "METAEMBED_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    extra_mb = float(res.stdout.strip().splitlines()[-1])
    print(f"peak extra RSS: {extra_mb:.1f} MB")
    assert extra_mb < 300, f"maxsim_grouped used {extra_mb:.0f} MB extra"


@pytest.mark.parametrize("op", ["maxsim_grouped", "maxsim_paired", "matryoshka_infonce"])
def test_half_precision_backward_holds_no_fp32_candidate_gradient(op):
    """A bf16 backward returns the candidates' gradient in bf16 without an fp32 copy of it: each
    candidate's rows are summed in fp32 scratch and stored once (csrc/cpu kernels.h). The peak RSS
    that the backward adds stays under 1.5x the bf16 gradient; an fp32 buffer plus its conversion
    would be 3x."""
    code = textwrap.dedent(
        f"""
        import torch, metaembed_kernels as mk
        def rss_kb(field):
            for line in open('/proc/self/status'):
                if line.startswith(field):
                    return int(line.split()[1])
        def run(n):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(8, 16, 128, generator=g).bfloat16().requires_grad_()
            if "{op}" == "maxsim_paired":
                c = torch.randn(8, n // 8, 64, 128, generator=g).bfloat16().requires_grad_()
                out = mk.maxsim_paired(q, c, backend='cpu').sum()
            elif "{op}" == "maxsim_grouped":
                c = torch.randn(n, 64, 128, generator=g).bfloat16().requires_grad_()
                out = mk.maxsim_grouped(q, c, mk.DEFAULT_GROUPS, backend='cpu').sum()
            else:
                c = torch.randn(n, 64, 128, generator=g).bfloat16().requires_grad_()
                out = mk.matryoshka_infonce(q, c, mk.DEFAULT_GROUPS, backend='cpu')
            return out, c
        out, c = run(16)
        out.backward()  # warm up lazy initialisation
        out, c = run(2048)
        open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
        before = rss_kb('VmRSS')
        out.backward()
        print((rss_kb('VmHWM') - before) / 1024, c.numel() * 2 / 2**20)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "METAEMBED_BACKEND"}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    extra_mb, grad_mb = map(float, res.stdout.strip().splitlines()[-1].split())
    print(f"{op}: backward peak {extra_mb:.1f} MiB for a {grad_mb:.1f} MiB bf16 gradient")
    assert extra_mb < 1.5 * grad_mb, f"{op}: backward added {extra_mb:.0f} MiB for a {grad_mb:.0f} MiB gradient"


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """c has 8200 * 64 * 4096 = 2.15e9 > 2^31 elements (4.3 GB of bf16): the last candidates
    live beyond any 32-bit offset and must score exactly like a small copy of themselves."""
    nc, rc, d = 8200, 64, 4096
    assert nc * rc * d > 2**31
    gen = torch.Generator().manual_seed(5)
    c = torch.zeros(nc, rc, d, dtype=torch.bfloat16)
    tail = normal_values((4, rc, d), gen, torch.bfloat16)
    c[-4:] = tail
    c[0] = tail[0]
    q = normal_values((2, 16, d), gen, torch.bfloat16)
    out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cpu")
    ref = reference.maxsim_grouped(q.double(), tail.double(), DEFAULT_GROUPS)
    assert_close(out[:, :, -4:], ref, score_tolerance(q, tail, DEFAULT_GROUPS), "far candidates")
    assert_close(out[:, :, 0], ref[:, :, 0], score_tolerance(q, tail[:1], DEFAULT_GROUPS)[:, :, 0], "first")
    assert torch.all(out[:, :, 1:-4] == 0)
    # one query token: the few-token dot path reads the same far rows
    one = maxsim_grouped(q[:1, :1], c, ((1, 1), (1, rc)), backend="cpu")
    ref_one = reference.maxsim_grouped(q[:1, :1].double(), tail.double(), ((1, 1), (1, rc)))
    assert_close(one[:, :, -4:], ref_one, score_tolerance(q[:1, :1], tail, ((1, 1), (1, rc))), "far, one token")


# maxsim_grouped's candidate-lanes layout (csrc/cpu kernels.h, Layout): more than 4 query
# tokens at budgets r_q <= MR, r_c <= 8 put NR candidates in the lanes of a register tile and
# broadcast query tokens. Shapes: a partial last candidate block (N = 37, N = 5 < NR), several
# query blocks (Nq = 300 at r_q = 4), odd and short D (bf16 pairs with a lone last dim), budgets
# that take prefixes of the stored tokens; masks with empty rows and holes (not prefixes); a
# large output.
LANES_CASES = [
    (dict(nq=9, nc=37, rq=5, rc=9, d=33), ((1, 1),)),
    (dict(nq=13, nc=37, rq=5, rc=9, d=128), ((2, 4),)),
    (dict(nq=7, nc=5, rq=3, rc=8, d=20), ((1, 1), (2, 4), (3, 8))),
    (dict(nq=300, nc=37, rq=4, rc=8, d=128), ((4, 8), (1, 1))),
    (dict(nq=6, nc=40, rq=2, rc=2, d=17), ((2, 2), (1, 1))),
    # scores past 4 MiB in 64-byte aligned rows: full blocks take non-temporal stores (AVX-512)
    (dict(nq=64, nc=16400, rq=2, rc=3, d=16), ((1, 1), (2, 3))),
    # (1, 1) alone (a plain GEMM): scores stored from the micro-kernel's registers, streamed
    (dict(nq=64, nc=16400, rq=1, rc=1, d=16), ((1, 1),)),
]


def lanes_masks(nq, nc, rq, rc, gen):
    """Random holes, one query and two candidates with no valid token, one candidate valid
    only past the smallest budget."""
    qm = torch.rand(nq, rq, generator=gen) > 0.3
    cm = torch.rand(nc, rc, generator=gen) > 0.3
    qm[1] = False
    cm[3] = False
    cm[-1] = False
    cm[4] = False
    cm[4, -1] = True
    return qm, cm


@pytest.mark.parametrize("nc", [37, 16400])
def test_candidate_lanes_gemm_rows_with_infinite_tokens(cpu_isa, nc):
    """(1, 1) alone stores its scores straight from the micro-kernel's registers (engine.h,
    lane_direct_tile). A masked token is a zero lane or row there, so an infinite valid token
    against it gives inf * 0 = NaN in the product: the score must still be 0 (empty prefix,
    masked query token), and infinite products of valid pairs follow torch."""
    gen = torch.Generator().manual_seed(nc)
    q, c = torch.randn(64, 1, 16, generator=gen), torch.randn(nc, 1, 16, generator=gen)
    q[0, 0, 0], c[5, 0, 0] = float("inf"), float("-inf")
    q_mask, c_mask = torch.ones(64, 1, dtype=torch.bool), torch.ones(nc, 1, dtype=torch.bool)
    c_mask[3], q_mask[7] = False, False
    out = maxsim_grouped(q, c, ((1, 1),), q_mask=q_mask, c_mask=c_mask, backend="cpu")
    assert out[0, 0, 3] == 0 and out[0, 7, 5] == 0 and out[0, 0, 5] == float("-inf")
    ref = reference.maxsim_grouped(q.double(), c.double(), ((1, 1),), q_mask, c_mask).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LANES_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c[0].items()))
def test_every_isa_candidate_lanes(cpu_isa, case, dtype):
    shape, groups = case
    nq, nc, rq, rc, d = (shape[k] for k in ("nq", "nc", "rq", "rc", "d"))
    gen = torch.Generator().manual_seed(nq * 1000 + nc)
    qm, cm = lanes_masks(nq, nc, rq, rc, gen)
    q, c = normal_values((nq, rq, d), gen, dtype), normal_values((nc, rc, d), gen, dtype)
    ref = reference.maxsim_grouped(q.double(), c.double(), groups, qm, cm)
    for masks in ((qm, cm), (None, None)):
        out = maxsim_grouped(q, c, groups, q_mask=masks[0], c_mask=masks[1], backend="cpu")
        expected = ref if masks[0] is not None else reference.maxsim_grouped(q.double(), c.double(), groups)
        assert_close(out, expected, score_tolerance(q, c, groups), f"scores, masks: {masks[0] is not None}")
    # masked tokens are never read: NaN there changes nothing
    qn, cn = q.clone(), c.clone()
    qn[~qm] = float("nan")
    cn[~cm] = float("nan")
    assert torch.equal(maxsim_grouped(qn, cn, groups, q_mask=qm, c_mask=cm, backend="cpu"),
                       maxsim_grouped(q, c, groups, q_mask=qm, c_mask=cm, backend="cpu"))

    # gradients through the saved argmax (exact values: ties decided as in the reference)
    qe, ce = exact_values((nq, rq, d), gen, dtype), exact_values((nc, rc, d), gen, dtype)
    grad = torch.randn(len(groups), nq, nc, generator=gen)
    qk, ck = qe.clone().requires_grad_(), ce.clone().requires_grad_()
    maxsim_grouped(qk, ck, groups, q_mask=qm, c_mask=cm, backend="cpu").backward(grad)
    qr, cr = qe.double().requires_grad_(), ce.double().requires_grad_()
    reference.maxsim_grouped(qr, cr, groups, qm, cm).backward(grad.double())
    gmax = torch.tensor(grad.abs().max().item())
    assert_close(qk.grad, qr.grad, grad_tolerance(qr.grad, dtype, nc * len(groups), gmax), "dq")
    assert_close(ck.grad, cr.grad, grad_tolerance(cr.grad, dtype, nq * rq * len(groups), gmax), "dc")

    # the saved argmax equals the backward's recompute (query-panel layout) on random values,
    # near-ties included; the scores do not depend on whether it is saved
    ops = ops_of("cpu")
    grq, grc = [g[0] for g in groups], [g[1] for g in groups]
    scores, argmax = ops("maxsim_grouped")(q, c, grq, grc, qm, cm, True)
    plain, _ = ops("maxsim_grouped")(q, c, grq, grc, qm, cm)
    assert torch.equal(scores, plain)
    g = torch.randn(scores.shape, dtype=scores.dtype, generator=gen)
    saved = ops("maxsim_grouped_backward")(g, q, c, grq, grc, qm, cm, [True, True], argmax)
    again = ops("maxsim_grouped_backward")(g, q, c, grq, grc, qm, cm, [True, True])
    for a, b in zip(saved, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_isa_candidate_lanes_nonfinite(cpu_isa, dtype):
    """A NaN or an infinity in a valid token reaches the scores as in the float64 reference
    (torch.amax semantics), and the forward is the same with the argmax saved or not."""
    gen = torch.Generator().manual_seed(11)
    nq, nc, rq, rc, d = 11, 37, 3, 6, 24
    groups = ((1, 1), (2, 4), (3, 6))
    qm, cm = lanes_masks(nq, nc, rq, rc, gen)
    q, c = normal_values((nq, rq, d), gen, dtype), normal_values((nc, rc, d), gen, dtype)
    c[5, 0, 3] = float("nan")  # valid or not, depending on the mask
    c[6, 2, 0] = float("nan")
    c[7, 1, 1] = float("inf")
    c[33, 0, 2] = -float("inf")
    q[2, 0, 5] = float("inf")
    cm[5, 0] = cm[6, 2] = cm[7, 1] = cm[33, 0] = True
    qm[2, 0] = True
    out = maxsim_grouped(q, c, groups, q_mask=qm, c_mask=cm, backend="cpu").double()
    ref = reference.maxsim_grouped(q.double(), c.double(), groups, qm, cm)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    tol = score_tolerance(q.nan_to_num(0, 0, 0), c.nan_to_num(0, 0, 0), groups)
    assert_close(out[finite], ref[finite], tol[finite], "finite scores")
    ops = ops_of("cpu")
    grq, grc = [g[0] for g in groups], [g[1] for g in groups]
    saved, _ = ops("maxsim_grouped")(q, c, grq, grc, qm, cm, True)
    plain, _ = ops("maxsim_grouped")(q, c, grq, grc, qm, cm)
    assert torch.equal(saved.isnan(), plain.isnan())
    assert torch.equal(saved.nan_to_num(), plain.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["grouped", "paired"])
def test_every_isa_register_fold_without_argmax(cpu_isa, op, dtype):
    """A forward that saves no argmax folds whole register tiles into the running max
    (engine.h, fold_tile; Policy::MaxFold): tiles past the first boundaries, the last short
    tile, masks that are neither prefixes nor non-empty, and NaN / inf in valid and masked
    candidate tokens at every row of a tile. The scores equal the float64 reference, NaN
    where it has NaN, and the same forward with the argmax saved (the per-row fold)."""
    gen = torch.Generator().manual_seed(12)
    nq, nc, rq, rc, d = 5, 7, 9, 29, 24  # rc = 3 tiles of 8 + a tail of 5
    groups = ((1, 1), (2, 4), (3, 8), (9, 16), (5, 29), (9, 24))
    q, qm = normal_values((nq, rq, d), gen, dtype), torch.rand(nq, rq, generator=gen) > 0.3
    shape = (nc, rc, d) if op == "grouped" else (nq, nc, rc, d)
    c, cm = normal_values(shape, gen, dtype), torch.rand(shape[:-1], generator=gen) > 0.3
    cm[1] = False  # an empty candidate
    cm[2, :16] = False  # valid tokens only in the last tiles
    for j, value in zip(range(8, 16), ["nan", "inf", "-inf", "nan", "nan", "inf", "-inf", "nan"]):
        c[..., 3 + j % 4, j, j % d] = float(value)  # every row of the second tile, valid or masked
    c[..., 4, 27, 1] = float("nan")  # the tail tile
    if op == "grouped":
        fn, ref_fn, name = maxsim_grouped, reference.maxsim_grouped, "maxsim_grouped"
    else:
        fn, ref_fn, name = maxsim_paired_grouped, reference.maxsim_grouped_paired, "maxsim_paired_grouped"
    for masks in ((qm, cm), (None, None)):
        out = fn(q, c, groups, q_mask=masks[0], c_mask=masks[1], backend="cpu").double()
        ref = ref_fn(q.double(), c.double(), groups, *masks)
        assert torch.equal(out.isnan(), ref.isnan()), f"NaN at {out.isnan().nonzero().tolist()}"
        infinite = ref.isinf()
        assert torch.equal(out[infinite], ref[infinite])
        finite = torch.isfinite(ref)
        # score_tolerance's bound, from the op's own MaxSim of |q| and |c|
        magnitude = ref_fn(q.nan_to_num(0, 0, 0).double().abs(), c.nan_to_num(0, 0, 0).double().abs(), groups)
        tol = 4 * (d + rq) * 2.0**-24 * magnitude + 1e-30
        assert_close(out[finite], ref[finite], tol[finite], f"scores, masks: {masks[0] is not None}")
        grq, grc = [g[0] for g in groups], [g[1] for g in groups]
        saved, _ = ops_of("cpu")(name)(q, c, grq, grc, *masks, True)
        assert torch.equal(saved.isnan(), out.isnan())
        assert torch.equal(saved.nan_to_num(), out.float().nan_to_num())


@pytest.mark.parametrize("op", ["grouped", "paired"])
def test_every_isa_register_fold_argmax_takes_the_first_valid_minus_infinity(cpu_isa, op):
    """With the argmax saved (a forward under autograd) the register fold takes a candidate's
    first valid row unconditionally: when every valid similarity is -inf (q = 1e20, c = -1e20
    overflow), the argmax is still the first valid token and the gradient reaches it, as in the
    float64 reference (torch.argmax semantics). Query-panel layout: r_q = 9 tokens."""
    nq, nc, rq, rc, d = 2, 3, 9, 21, 5
    groups = ((1, 1), (9, 4), (4, 21))
    q = torch.full((nq, rq, d), 1e20)
    shape = (nc, rc, d) if op == "grouped" else (nq, nc, rc, d)
    c = torch.full(shape, -1e20)
    c_mask = torch.ones(shape[:-1], dtype=torch.bool)
    c_mask[..., 0, :10] = False  # candidate 0: first valid token 10, in the second tile
    fn, ref_fn = ((maxsim_grouped, reference.maxsim_grouped) if op == "grouped"
                  else (maxsim_paired_grouped, reference.maxsim_grouped_paired))
    weights = torch.linspace(0.5, 1.5, len(groups) * nq * nc).view(len(groups), nq, nc)
    outs, grads = [], []
    for run in ("cpu", "oracle"):
        qq, cc = q.clone().double().requires_grad_(), c.clone().double().requires_grad_()
        if run == "cpu":
            qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
            out = fn(qq, cc, groups, c_mask=c_mask, backend="cpu")
        else:
            out = ref_fn(qq.float(), cc.float(), groups, None, c_mask)
        outs.append(out.detach().float())
        grads.append(torch.autograd.grad((out * weights).sum(), (qq, cc)))
    assert torch.equal(outs[0], outs[1])  # candidate 0 is empty (0) at r_c = 1 and 4, else -inf
    assert torch.isneginf(outs[0][..., 1:]).all() and torch.isneginf(outs[0][2]).all()
    for name, got, want in zip(("dq", "dc"), *grads):
        assert torch.equal(got != 0, want != 0), f"{name}: gradient on {(got != 0).nonzero().tolist()[:5]} ..."
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=0, msg=name)
    assert (grads[0][1][..., 0, 10, :] != 0).all() and (grads[0][1][..., 0, :10, :] == 0).all()
