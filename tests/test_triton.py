"""Triton backend specifics. The shared parity sweeps (test_maxsim.py, test_loss.py) already
run "triton" through the interpreter; this file adds:

  * the heuristic table's invariants, and that the compile gate covers every config it picks;
  * the compile gate itself (`python -m metaembed_kernels.triton.verify`), and checks that
    its checks can fail;
  * interpreter tests of what the sweeps do not reach: fp32-level gradient accumulation
    with 16-bit inputs (the split products), fp16 range scaling, padding that is never
    read, many groups, several hard-negative blocks, direct op calls, opcheck;
  * real-GPU tests (skipped without CUDA): parity at the paper's width, determinism,
    offsets past 2^31 elements, auto-dispatch.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    UNIT_ROUNDOFF,
    assert_close,
    exact_values,
    grad_tolerance,
    normal_values,
    random_masks,
    requires_gpu,
    score_tolerance,
)
from metaembed_kernels import DEFAULT_GROUPS, available_backends, matryoshka_infonce, maxsim_grouped, reference

triton = pytest.importorskip("triton")
on_gpu = torch.cuda.is_available()
interpreter = pytest.mark.skipif(
    on_gpu or "triton" not in available_backends("cpu"), reason="interpreter tests run CPU tensors (no GPU here)"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def H():
    from metaembed_kernels.triton import heuristics

    return heuristics


# ---------------------------------------------------------------------------------------
# Heuristic table
# ---------------------------------------------------------------------------------------
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def all_configs():
    """Every config the table picks for budgets inside the supported tile sizes."""
    h = H()
    for dtype in ALL_DTYPES:
        for rq in (1, 2, 5, 16, 17, 32, 33, 64):
            for rc in (1, 3, 7, 64, 65, 128):
                if h.unsupported_reason(rq, rc) is not None:
                    continue
                for d in (1, 24, 129, 3584):
                    for nq in (1, 3, 1000):
                        yield "fwd", h.maxsim_forward_config(nq, rq, rc, d, dtype), rq, rc, dtype
                    yield "loss", h.infonce_forward_config(rq, rc, d, dtype), rq, rc, dtype
                    yield "grad", h.gradient_config(rq, rc, d, dtype), rq, rc, dtype
                    yield "hn", h.hard_negative_config(rq, rc, d, dtype, backward=False), rq, rc, dtype
                    yield "hn-bwd", h.hard_negative_config(rq, rc, d, dtype, backward=True), rq, rc, dtype


def test_heuristic_tiles_are_valid_triton_shapes():
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    for kind, cfg, rq, rc, _ in all_configs():
        assert cfg.m >= 16 and cfg.n >= 16 and cfg.block_d >= 16, (kind, cfg)  # tl.dot minimum
        assert all(pow2(v) for v in (cfg.block_q, cfg.rq_tile, cfg.block_c, cfg.rc_tile, cfg.block_d)), (kind, cfg)
        assert cfg.rq_tile >= rq and cfg.rc_tile >= rc, (kind, cfg)  # one query/candidate per tile slot
        assert cfg.num_warps in (4, 8) and cfg.num_stages in (2, 3)
        if kind in ("grad", "hn-bwd"):
            assert pow2(cfg.block_do) and cfg.block_do >= 16



def test_supported_budgets_never_need_larger_tiles_than_the_gate_compiles():
    """Inside the supported budgets, no kernel's tile exceeds (in M*N, M and N) the largest
    tile of that kernel the compile gate verifies."""
    from metaembed_kernels.triton import verify

    h = H()
    assert h.unsupported_reason(64, 64) is None and h.unsupported_reason(32, 128) is None
    assert h.unsupported_reason(65, 1) and h.unsupported_reason(1, 129) and h.unsupported_reason(64, 128)
    kinds = {"fwd": "maxsim_forward_kernel", "loss": "infonce_forward_kernel", "grad": "grad_query_kernel",
             "hn": "infonce_hard_negatives_forward_kernel", "hn-bwd": "infonce_hard_negatives_backward_kernel"}
    largest = {}
    for dtype in ALL_DTYPES:
        for rq, rc in verify.SHAPES:
            for _, plan in verify.candidate_plans(dtype, rq, rc, 128):
                cfg, key = plan.config, (plan.kernel.__name__, dtype)
                m, n, mn = largest.get(key, (0, 0, 0))
                largest[key] = (max(m, cfg.m), max(n, cfg.n), max(mn, cfg.m * cfg.n))
    for kind, cfg, rq, rc, dtype in all_configs():
        m, n, mn = largest[(kinds[kind], dtype)]
        assert cfg.m <= m and cfg.n <= n and cfg.m * cfg.n <= mn, (kind, rq, rc, dtype, cfg)


def test_heuristic_table_values_for_the_paper_shapes():
    h = H()
    # one query against a 100k index: a 16-row tile (nothing computed for absent queries)
    single = h.maxsim_forward_config(1, 16, 64, 3584, torch.bfloat16)
    assert (single.m, single.n, single.block_d, single.num_warps) == (16, 128, 64, 4)
    # a query batch: 128 x 128 tiles (the wgmma shape on sm_90)
    batch = h.maxsim_forward_config(1000, 16, 64, 3584, torch.bfloat16)
    assert (batch.block_q, batch.block_c, batch.num_warps) == (8, 2, 8)
    assert h.maxsim_forward_config(1000, 16, 64, 3584, torch.float32).m == 64  # fp32 FMA cap
    grad = h.gradient_config(16, 64, 3584, torch.bfloat16)
    assert (grad.m, grad.n, grad.num_warps) == (64, 64, 8)
    assert h.groups_pad(5) == 8 and h.groups_pad(9) == 16
    num = h.numerics(torch.float32)
    assert num["DOT_PRECISION"] == "ieee" and num["SPLIT_FP32_OPERANDS"]
    assert h.numerics(torch.float16)["SCALE_TO_FP16_RANGE"] and not h.numerics(torch.bfloat16)["SCALE_TO_FP16_RANGE"]


def test_compile_gate_covers_every_config_the_heuristics_pick_on_its_grid():
    """The gate compiles a few Nq values; every Nq must map to one of their configs."""
    from metaembed_kernels.triton import verify

    h = H()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rq, rc in verify.SHAPES:
            for d in verify.DIMS:
                plans = verify.candidate_plans(dtype, rq, rc, d)
                compiled = {(plan.kernel.__name__, plan.config) for _, plan in plans}
                picks = {("maxsim_forward_kernel", h.maxsim_forward_config(nq, rq, rc, d, dtype))
                         for nq in range(1, 1100)}
                picks |= {("infonce_forward_kernel", h.infonce_forward_config(rq, rc, d, dtype)),
                          ("grad_query_kernel", h.gradient_config(rq, rc, d, dtype)),
                          ("grad_candidate_kernel", h.gradient_config(rq, rc, d, dtype)),
                          ("infonce_hard_negatives_forward_kernel", h.hard_negative_config(rq, rc, d, dtype, False)),
                          ("infonce_hard_negatives_backward_kernel", h.hard_negative_config(rq, rc, d, dtype, True))}
                assert picks <= compiled, picks - compiled
                assert {8, 16} <= {plan.constexprs.get("GROUPS_PAD") for _, plan in plans}


# ---------------------------------------------------------------------------------------
# Compile gate
# ---------------------------------------------------------------------------------------
def _gate_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for real targets
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_compile_gate_passes_for_sm80_and_sm90():
    """`python -m metaembed_kernels.triton.verify`: every launchable configuration, bf16/fp16/
    fp32, D in {128, 3584}, (Rq, Rc) in {(16, 64), (32, 128)}, compiled for sm_80 and sm_90
    with MMA / no-spill / shared-memory checks (takes ~2 min on 2 cores with a cold cache)."""
    result = subprocess.run(
        [sys.executable, "-m", "metaembed_kernels.triton.verify", "--jobs", "2"],
        cwd=REPO, env=_gate_env(), capture_output=True, text=True, timeout=1800,
    )
    out = result.stdout
    assert result.returncode == 0, out[-5000:] + result.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("sm_")]
    assert len(rows) >= 100 and all(line.endswith(" ok") for line in rows), out[-3000:]
    assert {"sm_80", "sm_90"} <= {line.split()[0] for line in rows}
    # The main forward configuration on sm_90 issues wgmma; 16-bit kernels on sm_80 mma.sync.
    main_forward = [r for r in rows if r.startswith("sm_90") and "maxsim forward" in r and "128x128" in r
                    and " fp32 " not in r]
    assert main_forward and all(" wgmma " in r for r in main_forward)
    assert all(" mma.sync " in r for r in rows if r.startswith("sm_80") and " fp32 " not in r)
    assert "0 failed" in out


def test_gate_checks_can_fail():
    from metaembed_kernels.triton import verify

    class Plan:
        role, config = "maxsim forward", H().TileConfig(8, 16, 2, 64, 64, 0, 8, 3)

    def flagged(**kw):
        row = verify.Row(kw.pop("target", 80), "maxsim forward", kw.pop("dtype", "bf16"), "(16,64)", [128], "", "")
        row.regs, row.shared, row.local, row.stack, row.mma = 100, 1024, 0, 0, "mma.sync"
        for k, v in kw.items():
            setattr(row, k, v)
        verify.check(row, Plan, row.dtype)
        return row.failures

    assert flagged() == []
    assert flagged(local=8) and flagged(stack=16)  # spills, either way ptxas reports them
    assert flagged(shared=164 * 1024)
    assert flagged(mma="fma") and flagged(mma="wgmma")  # sm_80 must use mma.sync
    assert flagged(target=90, mma="mma.sync")  # the main forward config must use wgmma on sm_90
    assert flagged(target=90, mma="wgmma") == []
    assert flagged(dtype="fp32", mma="fma") == []  # fp32 similarity is FMA by design
    assert verify.mma_kind("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma"
    assert verify.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma.sync"
    assert verify.mma_kind("fma.rn.f32") == "fma"


def test_gate_detects_a_spilling_kernel():
    """A config the heuristics never pick -- fp32 maxsim forward at 128 x 256 with 4 warps, an
    accumulator of 256 fp32 registers per thread -- must be reported as spilling (ptxas 13.x
    reports such spills as STACK with LOCAL:0)."""
    code = r"""
import dataclasses, sys, torch
from metaembed_kernels.triton import verify, launch
from metaembed_kernels.triton.heuristics import TileConfig
q = torch.empty(8, 16, 128, dtype=torch.float32, device="meta")
c = torch.empty(1000, 64, 128, dtype=torch.float32, device="meta")
p = launch.make_problem(q, c, [16], [64], None, None, interpret=False)
_, [plan] = launch.plan_maxsim_forward(p)
cfg = TileConfig(8, 16, 4, 64, 32, 0, 4, 3)
plan = dataclasses.replace(plan, config=cfg, constexprs=dict(plan.constexprs, BLOCK_Q=8, BLOCK_C=4, BLOCK_D=32))
verify.candidate_plans = lambda *a: [("test", plan)]
job = verify.collect([80], ["fp32"], dims=(128,), shapes=((16, 64),))[0]
row = verify.compile_job(job)
print(verify.format_row(row))
sys.exit(0 if any("spills" in f for f in row.failures) else 1)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_gate_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# Interpreter: what the shared sweeps do not reach
# ---------------------------------------------------------------------------------------
def _launch_maxsim_backward_fp32_accumulators(q, c, groups, grad, q_mask=None, c_mask=None):
    """dq, dc straight from the kernels' fp32 accumulators (before rounding to q's dtype)."""
    from metaembed_kernels.triton import launch

    p = launch.make_problem(q, c, [g[0] for g in groups], [g[1] for g in groups], q_mask, c_mask)
    dq, dc, plans = launch.plan_maxsim_backward(p, grad)
    launch.run(plans)
    return dq, dc


def _reference_grads(q, c, groups, grad, q_mask=None, c_mask=None):
    q_r, c_r = q.double().requires_grad_(), c.double().requires_grad_()
    reference.maxsim_grouped(q_r, c_r, groups, q_mask, c_mask).backward(grad.double())
    return q_r.grad, c_r.grad


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gradient_accumulation_is_fp32_accurate_for_every_dtype(dtype):
    """The gradient products split fp32 weights into 16-bit pieces (and fp32 inputs into bf16
    pieces): the fp32 accumulators must match float64 to fp32 accumulation error, far below
    one 16-bit rounding of the weights (which a single 16-bit product would incur)."""
    gen = torch.Generator().manual_seed(21)
    q = exact_values((5, 16, 40), gen, dtype)
    c = exact_values((9, 64, 40), gen, dtype)
    if dtype == torch.float32:  # inputs needing all 24 bits exercise the x split too
        q, c = normal_values(q.shape, gen), normal_values(c.shape, gen)
    groups = DEFAULT_GROUPS
    grad = torch.randn(len(groups), 5, 9, generator=gen)
    dq, dc = _launch_maxsim_backward_fp32_accumulators(q, c, groups, grad)
    dq_ref, dc_ref = _reference_grads(q, c, groups, grad)
    # Each element sums n products whose magnitudes add up to <= n * max|grad| * max|x|
    # (n = Nc * G for dq, Nq * Rq * G for dc); fp32 accumulation errs by a few u32 of that.
    u32, g, n_q, n_c = UNIT_ROUNDOFF[torch.float32], grad.abs().max().item(), 9 * 5, 5 * 16 * 5
    tol_q = 8 * n_q * u32 * g * c.abs().max().item()
    tol_c = 8 * n_c * u32 * g * q.abs().max().item()
    assert_close(dq, dq_ref, tol_q, f"dq fp32 accumulator ({dtype})")
    assert_close(dc, dc_ref, tol_c, f"dc fp32 accumulator ({dtype})")
    # ... while rounding one weight to bf16 alone errs by up to 2^-9 |W| |x| per term
    assert tol_q < 0.05 * UNIT_ROUNDOFF[torch.bfloat16] * g * c.abs().max().item()


@interpreter
@pytest.mark.parametrize("grad_scale", [1e-7, 3e4], ids=["tiny", "huge"])
def test_fp16_gradients_are_scale_invariant(grad_scale):
    """fp16 pieces are scaled into fp16's range: gradients ~1e-7 (subnormal in fp16) or with
    weights > 65504 (overflow in fp16) come out as accurately as gradients of size 1."""
    gen = torch.Generator().manual_seed(5)
    q = exact_values((3, 5, 24), gen, torch.float16)
    c = exact_values((4, 7, 24), gen, torch.float16)
    groups = ((5, 7), (5, 7), (2, 3))  # repeated groups add up in W: |W| up to 3 * |grad|
    grad = torch.randn(3, 3, 4, generator=gen) * grad_scale
    dq, dc = _launch_maxsim_backward_fp32_accumulators(q, c, groups, grad)
    dq_ref, dc_ref = _reference_grads(q, c, groups, grad)
    assert torch.isfinite(dq).all() and torch.isfinite(dc).all()
    tol = 64 * UNIT_ROUNDOFF[torch.float32] * grad.abs().max().item() * 16
    assert_close(dq, dq_ref, tol, "dq")
    assert_close(dc, dc_ref, tol, "dc")


@interpreter
def test_tokens_beyond_the_largest_group_are_never_read():
    """Only the first max r_q / max r_c tokens are loaded: NaN beyond them changes nothing."""
    gen = torch.Generator().manual_seed(8)
    q = normal_values((4, 9, 20), gen)
    c = normal_values((6, 11, 20), gen)
    groups = ((3, 5), (1, 2), (3, 1))
    q_nan, c_nan = q.clone(), c.clone()
    q_nan[:, 3:] = float("nan")
    c_nan[:, 5:] = float("nan")
    q_nan.requires_grad_()
    c_nan.requires_grad_()
    out = maxsim_grouped(q_nan, c_nan, groups, backend="triton")
    expected = reference.maxsim_grouped(q.double(), c.double(), groups)
    assert_close(out, expected, score_tolerance(q, c, groups), "scores")
    out.sum().backward()
    assert torch.isfinite(q_nan.grad).all() and torch.all(q_nan.grad[:, 3:] == 0)
    assert torch.isfinite(c_nan.grad).all() and torch.all(c_nan.grad[:, 5:] == 0)


@interpreter
def test_absent_masks_equal_all_true_masks_bitwise():
    gen = torch.Generator().manual_seed(9)
    q, c = normal_values((3, 5, 24), gen), normal_values((5, 7, 24), gen)
    groups = ((5, 7), (2, 3))
    ones_q, ones_c = torch.ones(3, 5, dtype=torch.bool), torch.ones(5, 7, dtype=torch.bool)
    assert torch.equal(maxsim_grouped(q, c, groups, backend="triton"),
                       maxsim_grouped(q, c, groups, q_mask=ones_q, c_mask=ones_c, backend="triton"))


def _loss_case(nq, nc, rq, rc, d, k, groups, dtype, seed, masks=True):
    gen = torch.Generator().manual_seed(seed)
    x = dict(q=exact_values((nq, rq, d), gen, dtype), c=exact_values((nc, rc, d), gen, dtype),
             hn=exact_values((nq, k, rc, d), gen, dtype), labels=torch.randperm(nc, generator=gen)[:nq])
    if masks:
        x["q_mask"], x["c_mask"] = random_masks(nq, rq, nc, rc, gen)
        x["hn_mask"] = torch.rand(nq, k, rc, generator=gen) > 0.3
    return x


def _check_loss_against_reference(x, groups, temperature=0.2, weights=None):
    kw = dict(temperature=temperature, labels=x["labels"], weights=weights, return_group_losses=True)
    masks = dict(q_mask=x.get("q_mask"), c_mask=x.get("c_mask"), hard_negatives_mask=x.get("hn_mask"))
    q, c, hn = (x[n].clone().requires_grad_() for n in ("q", "c", "hn"))
    loss, per_group = matryoshka_infonce(q, c, groups, hard_negatives=hn, backend="triton", **kw, **masks)
    loss.backward()
    qr, cr, hr = (x[n].double().requires_grad_() for n in ("q", "c", "hn"))
    loss_r, per_group_r = reference.matryoshka_infonce(qr, cr, groups, hard_negatives=hr, **kw, **masks)
    loss_r.backward()
    assert_close(per_group, per_group_r, 1e-5 * (1 + per_group_r.abs()), "group losses")
    u = UNIT_ROUNDOFF[x["q"].dtype]
    for name, got, ref in (("dq", q.grad, qr.grad), ("dc", c.grad, cr.grad), ("dhn", hn.grad, hr.grad)):
        tol = 4 * u * ref.abs() + (2 * u if x["q"].dtype != torch.float32 else 1e-5) * ref.abs().max() + 1e-7
        assert_close(got, ref, tol, name)


@interpreter
def test_loss_over_several_query_candidate_and_hard_negative_blocks():
    """Nq over 2 query blocks, Nc over 10 candidate blocks (the online log-sum-exp rescales
    across them), K = 3 hard negatives at Rc = 64 (3 hard-negative blocks), masks."""
    x = _loss_case(nq=6, nc=20, rq=16, rc=64, d=40, k=3, groups=DEFAULT_GROUPS, dtype=torch.bfloat16, seed=2)
    _check_loss_against_reference(x, DEFAULT_GROUPS, weights=(1.0, 0.5, 2.0, 1.0, 0.25))


@interpreter
def test_loss_with_more_than_eight_groups():
    """G = 10 uses the 16-row state of the loss forward."""
    groups = tuple((1 + i % 4, 1 + (3 * i) % 7) for i in range(10))
    x = _loss_case(nq=4, nc=5, rq=4, rc=7, d=20, k=1, groups=groups, dtype=torch.float32, seed=3)
    _check_loss_against_reference(x, groups)


@interpreter
def test_direct_op_calls_check_what_memory_safety_needs():
    q, c = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    op = torch.ops.metaembed.triton_maxsim_grouped
    with pytest.raises(ValueError, match="out of range"):
        op(q, c, [4], [1], None, None)  # r_q > Rq would read past each query
    with pytest.raises(ValueError, match="out of range"):
        op(q, c, [1], [0], None, None)
    with pytest.raises(ValueError, match="equal length"):
        op(q, c, [1, 2], [1], None, None)
    with pytest.raises(ValueError, match="c_mask"):
        op(q, c, [1], [1], None, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="agree"):
        op(q, c[:, :, :4], [1], [1], None, None)
    hn = torch.randn(2, 1, 5, 8)
    infonce = torch.ops.metaembed.triton_matryoshka_infonce
    with pytest.raises(ValueError, match="hard_negatives"):
        infonce(q, c, torch.randn(2, 1, 4, 8), torch.tensor([0, 1]), [1], [1], 1.0, None, None, None)
    with pytest.raises(ValueError, match="tiles hold"):  # beyond the tiles the gate verifies
        op(torch.randn(1, 65, 8), c, [65], [1], None, None)
    with pytest.raises(ValueError, match="tiles hold"):
        op(q, torch.randn(1, 200, 8), [1], [129], None, None)
    with pytest.raises(ValueError, match="tiles hold"):
        op(torch.randn(1, 64, 8), torch.randn(1, 128, 8), [64], [128], None, None)
    # A label outside [0, Nc) is not an index anywhere: it only matches no candidate.
    terms, lse = infonce(q, c, hn, torch.tensor([0, 99]), [3], [5], 2.0, None, None, None)
    assert torch.isfinite(terms).all() and torch.equal(terms[:, 1], lse[:, 1])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_triton_ops(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 3, 16, generator=gen).to(dtype).requires_grad_()
    c = torch.randn(4, 5, 16, generator=gen).to(dtype).requires_grad_()
    hn = torch.randn(3, 1, 5, 16, generator=gen).to(dtype).requires_grad_()
    qm, cm = torch.rand(3, 3, generator=gen) > 0.2, torch.rand(4, 5, generator=gen) > 0.2
    rq, rc = [1, 3, 2], [1, 2, 5]
    ops = torch.ops.metaembed
    torch.library.opcheck(ops.triton_maxsim_grouped.default, (q, c, rq, rc, qm, cm))
    grad = torch.randn(3, 3, 4, generator=gen)
    torch.library.opcheck(ops.triton_maxsim_grouped_backward.default, (grad, q.detach(), c.detach(), rq, rc, qm, cm))
    labels = torch.tensor([1, 3, 0])
    torch.library.opcheck(ops.triton_matryoshka_infonce.default, (q, c, hn, labels, rq, rc, 2.5, qm, cm, None))
    terms, lse = ops.triton_matryoshka_infonce(q.detach(), c.detach(), hn.detach(), labels, rq, rc, 2.5, qm, cm, None)
    torch.library.opcheck(ops.triton_matryoshka_infonce_backward.default,
                          (torch.randn(3, 3, generator=gen), lse, q.detach(), c.detach(), hn.detach(), labels,
                           rq, rc, 2.5, qm, cm, None))


@interpreter
def test_torch_compile_sees_an_opaque_op():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 16, generator=gen, requires_grad=True)
    c = torch.randn(3, 8, 16, generator=gen, requires_grad=True)

    def step(q, c):
        return matryoshka_infonce(q, c, ((1, 1), (4, 8)), labels=torch.tensor([2, 0]), backend="triton") \
            + maxsim_grouped(q, c, ((2, 3),), backend="triton").mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = step(q, c)
    out = compiled(q, c)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, (q, c)), torch.autograd.grad(eager, (q, c)))


def test_roofline_of_the_paper_setting():
    """benchmarks/roofline.py, which the GPU benchmarks are judged against."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import roofline

    nbytes, flops = roofline.maxsim_cost(1, 100_000, 3584, ((16, 64),), torch.bfloat16)
    assert abs(flops - 2 * 16 * 64 * 3584 * 100_000) == 0 and abs(nbytes / 2**30 - 42.72) < 0.01
    h100, a100 = roofline.GPUS["H100"], roofline.GPUS["A100"]
    assert abs(roofline.Roofline(nbytes, flops, h100, torch.bfloat16).seconds - 13.69e-3) < 0.01e-3
    assert abs(roofline.Roofline(nbytes, flops, a100, torch.bfloat16).seconds - 22.94e-3) < 0.01e-3
    # intensity ~ Nq * r_q FLOP/B: compute-bound once Nq * 16 passes the ridge (295 / 156 FLOP/B)
    assert roofline.compute_bound_batch(100_000, 3584, ((16, 64),), torch.bfloat16, h100) == 19
    assert roofline.compute_bound_batch(100_000, 3584, ((16, 64),), torch.bfloat16, a100) == 10


# ---------------------------------------------------------------------------------------
# Real GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------
def _cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@requires_gpu
def test_gpu_auto_dispatch_picks_triton():
    from metaembed_kernels import select_backend

    assert select_backend(None, torch.device("cuda"), torch.bfloat16).name == "triton"


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 3000, 64, 3584), (37, 16, 500, 64, 128), (5, 32, 301, 128, 129),
                                   (17, 5, 33, 7, 24)], ids=str)
def test_gpu_maxsim_matches_reference(dtype, shape):
    nq, rq, nc, rc, d = shape
    gen = torch.Generator().manual_seed(nq + nc)
    q, c = normal_values((nq, rq, d), gen, dtype), normal_values((nc, rc, d), gen, dtype)
    q_mask, c_mask = random_masks(nq, rq, nc, rc, gen)
    groups = tuple(g for g in DEFAULT_GROUPS if g[0] <= rq and g[1] <= rc) + ((rq, rc),)
    out = maxsim_grouped(*_cuda(q, c), groups, q_mask=q_mask.cuda(), c_mask=c_mask.cuda(), backend="triton")
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out, expected, score_tolerance(q, c, groups), f"gpu scores {dtype}")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_gradients_and_loss_match_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    nq, nc, rq, rc, d = 24, 40, 16, 64, 200
    q, c = exact_values((nq, rq, d), gen, dtype), exact_values((nc, rc, d), gen, dtype)
    q_mask, c_mask = random_masks(nq, rq, nc, rc, gen)
    grad = torch.randn(len(DEFAULT_GROUPS), nq, nc, generator=gen)
    q_k, c_k = (t.clone().cuda().requires_grad_() for t in (q, c))
    maxsim_grouped(q_k, c_k, DEFAULT_GROUPS, q_mask=q_mask.cuda(), c_mask=c_mask.cuda(),
                   backend="triton").backward(grad.cuda())
    dq_ref, dc_ref = _reference_grads(q, c, DEFAULT_GROUPS, grad, q_mask, c_mask)
    g = torch.tensor(grad.abs().max().item())
    assert_close(q_k.grad, dq_ref, grad_tolerance(dq_ref, dtype, nc * 5, g), "gpu maxsim dq")
    assert_close(c_k.grad, dc_ref, grad_tolerance(dc_ref, dtype, nq * rq * 5, g), "gpu maxsim dc")
    x = _loss_case(nq=24, nc=40, rq=16, rc=64, d=200, k=2, groups=DEFAULT_GROUPS, dtype=dtype, seed=6)
    x = {k: v.cuda() for k, v in x.items()}
    # temperature 0.5 as in test_loss: with logits in the hundreds, fp32 itself (ulp(200) =
    # 2^-16) bounds the softmax's accuracy, whatever the kernel.
    kw = dict(temperature=0.5, labels=x["labels"], q_mask=x["q_mask"], c_mask=x["c_mask"],
              hard_negatives_mask=x["hn_mask"])
    q, c, hn = (x[n].clone().requires_grad_() for n in ("q", "c", "hn"))
    loss = matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, backend="triton", **kw)
    loss.backward()
    qr, cr, hr = (x[n].double().cpu().requires_grad_() for n in ("q", "c", "hn"))
    ref = reference.matryoshka_infonce(qr, cr, DEFAULT_GROUPS, hard_negatives=hr,
                                       **{k: v.cpu() for k, v in kw.items() if k != "temperature"}, temperature=0.5)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * (1 + abs(ref.item()))
    u = UNIT_ROUNDOFF[dtype]
    for name, got, want in (("dq", q.grad, qr.grad), ("dc", c.grad, cr.grad), ("dhn", hn.grad, hr.grad)):
        tol = 4 * u * want.abs() + (2 * u if dtype != torch.float32 else 1e-5) * want.abs().max() + 1e-7
        assert_close(got, want, tol, f"gpu loss {name}")


@requires_gpu
def test_gpu_backward_is_deterministic():
    gen = torch.Generator().manual_seed(11)
    q = normal_values((64, 16, 256), gen, torch.bfloat16).cuda().requires_grad_()
    c = normal_values((300, 64, 256), gen, torch.bfloat16).cuda().requires_grad_()
    hn = normal_values((64, 1, 64, 256), gen, torch.bfloat16).cuda().requires_grad_()
    grads = []
    for _ in range(3):
        q.grad = c.grad = hn.grad = None
        matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, labels=torch.arange(64, device="cuda"),
                           backend="triton").backward()
        grads.append((q.grad.clone(), c.grad.clone(), hn.grad.clone()))
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


@requires_gpu
def test_gpu_offsets_past_two_to_the_31_elements():
    """c has Nc * Rc * D > 2^31 elements (4.3 GB bf16): the last candidates' scores and
    gradients need 64-bit offsets."""
    rc, d = 64, 128
    nc = (2**31) // (rc * d) + 3
    # c (bf16) + its fp32 gradient accumulator + the bf16 gradient: 5 bf16-sized copies
    if torch.cuda.get_device_properties(0).total_memory < 5.5 * nc * rc * d * 2:
        pytest.skip("needs ~24 GB of GPU memory")
    gen = torch.Generator().manual_seed(12)
    q = normal_values((2, 16, d), gen, torch.bfloat16).cuda()
    tail = normal_values((5, rc, d), gen, torch.bfloat16)
    c = torch.zeros(nc, rc, d, dtype=torch.bfloat16, device="cuda")
    c[-5:] = tail.cuda()
    out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="triton")
    expected = reference.maxsim_grouped(q.double().cpu(), tail.double(), DEFAULT_GROUPS)
    assert_close(out[:, :, -5:], expected, score_tolerance(q.cpu(), tail, DEFAULT_GROUPS), "scores past 2^31")
    c.requires_grad_()
    grad = torch.zeros_like(out)
    grad[:, :, -1] = 1.0
    out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="triton")
    (dc,) = torch.autograd.grad(out, (c,), grad)
    _, dc_ref = _reference_grads(q.cpu(), tail, DEFAULT_GROUPS, grad[:, :, -5:].cpu())
    assert_close(dc[-5:], dc_ref, 2 * UNIT_ROUNDOFF[torch.bfloat16] * dc_ref.abs() + 1e-3, "dc past 2^31")
    assert int(torch.count_nonzero(dc[:-5])) == 0
