"""Triton backend specifics. The shared parity sweeps (test_maxsim.py, test_loss.py) already
run "triton" through the interpreter; this file adds:

  * the heuristic table's invariants, and that the compile gate covers every config it picks;
  * the compile gate itself (`python -m metaembed_kernels.triton.verify`), and checks that
    its checks can fail;
  * interpreter tests of what the sweeps do not reach: fp32-level gradient accumulation
    with 16-bit inputs (the split products), fp16 range scaling, padding that is never
    read, many groups, several hard-negative blocks, direct op calls, opcheck;
  * budgets beyond one tile (token chunks): parity at the production chunk sizes and, with
    the chunk sizes shrunk, over many chunk boundaries; ties across a chunk boundary; masks
    whose only valid tokens lie in a later chunk; group batches;
  * paired MaxSim (each query against its own candidates) against the float64 reference over
    the awkward-shape sweep, chunked budgets and group batches; output_mask (nothing allocated
    or launched for an unwanted gradient); the op contract's non-finite rules (NaN sticky and
    the lowest NaN argmax, -inf an ordinary value, masked NaN / inf never read, online LSE as
    torch.logsumexp) on every op family, single-tile and chunked, against the reference with
    NaN positions compared exactly; messages equal to the reference backend's;
  * real-GPU tests (skipped without CUDA): parity at the paper's width, determinism,
    offsets past 2^31 elements, auto-dispatch, paired parity at the KD shape, and the
    non-finite rules in compiled code (the interpreter's numpy is not the GPU).
"""
import dataclasses
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

from helpers import (
    UNIT_ROUNDOFF,
    assert_close,
    dtype_id,
    exact_values,
    grad_tolerance,
    normal_values,
    random_groups,
    random_masks,
    requires_gpu,
    score_tolerance,
    sweep_cases,
)
from metaembed_kernels import (DEFAULT_GROUPS, available_backends, matryoshka_infonce, maxsim_grouped,
                               maxsim_paired_grouped, reference)

triton = pytest.importorskip("triton")
on_gpu = torch.cuda.is_available()
interpreter = pytest.mark.skipif(
    on_gpu or "triton" not in available_backends("cpu"), reason="interpreter tests run CPU tensors (no GPU here)"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def H():
    from metaembed_kernels.triton import heuristics

    return heuristics


def triton_ops():
    """torch.ops.metaembed with the ``triton_*`` ops in it: they register when
    metaembed_kernels.triton.ops is first imported (the first call that selects triton), so a
    test calling them directly imports it first, whatever ran before it."""
    import metaembed_kernels.triton.ops  # noqa: F401

    return torch.ops.metaembed


# ---------------------------------------------------------------------------------------
# Heuristic table
# ---------------------------------------------------------------------------------------
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


BUDGET_RQ = (1, 2, 5, 16, 17, 32, 33, 64, 65, 96, 130, 1000)
BUDGET_RC = (1, 3, 7, 17, 64, 65, 128, 129, 300, 1030, 5000)


def all_configs():
    """Every config the table picks over a grid of budgets, single-tile and chunked."""
    h = H()
    for dtype in ALL_DTYPES:
        for rq in BUDGET_RQ:
            for rc in BUDGET_RC:
                for d in (1, 24, 129, 3584):
                    for nq in (1, 3, 1000):
                        yield "fwd", h.maxsim_forward_config(nq, rq, rc, d, dtype), rq, rc, dtype
                    yield "loss", h.infonce_forward_config(rq, rc, d, dtype), rq, rc, dtype
                    yield "grad", h.gradient_config(rq, rc, d, dtype), rq, rc, dtype
                    yield "hn", h.hard_negative_config(rq, rc, d, dtype, backward=False), rq, rc, dtype
                    yield "hn-bwd", h.hard_negative_config(rq, rc, d, dtype, backward=True), rq, rc, dtype
                    yield "paired", h.hard_negative_config(rq, rc, d, dtype, backward=False), rq, rc, dtype


def test_heuristic_tiles_are_valid_triton_shapes():
    h = H()
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    for kind, cfg, rq, rc, _ in all_configs():
        assert cfg.m >= 16 and cfg.n >= 16 and cfg.block_d >= 16, (kind, cfg)  # tl.dot minimum
        assert all(pow2(v) for v in (cfg.block_q, cfg.rq_tile, cfg.block_c, cfg.rc_tile, cfg.block_d)), (kind, cfg)
        # a query's / candidate's tokens share a tile, or are cut into chunks of a full tile
        assert (cfg.rq_tile >= rq) != cfg.q_chunked and (cfg.rc_tile >= rc) != cfg.c_chunked, (kind, rq, rc, cfg)
        assert cfg.rq_tile <= 64 and cfg.rc_tile <= 128 and cfg.rq_tile * cfg.rc_tile <= 4096, (kind, cfg)
        if cfg.chunked:  # the carried per-group state (GROUPS_PAD x M x BLOCK_C) stays small
            assert cfg.rc_tile >= h.CHUNK_MIN_RC and cfg.block_c <= 2 and cfg.m * cfg.block_c <= 256, (kind, cfg)
        assert cfg.num_warps in (4, 8) and cfg.num_stages in (2, 3)
        if kind in ("grad", "hn-bwd"):
            assert pow2(cfg.block_do) and cfg.block_do >= 16


def test_single_tile_budgets_keep_their_tiles():
    """Budgets that fit one tile are never chunked and get pow2(max r_q) x pow2(max r_c)."""
    h = H()
    for rq in BUDGET_RQ:
        for rc in BUDGET_RC:
            fits = h.next_power_of_two(rq) <= 64 and h.next_power_of_two(rc) <= 128 and \
                h.next_power_of_two(rq) * h.next_power_of_two(rc) <= 4096
            cfg = h.gradient_config(rq, rc, 128, torch.bfloat16)
            assert cfg.chunked != fits, (rq, rc, cfg)
            if fits:
                assert (cfg.rq_tile, cfg.rc_tile) == (h.next_power_of_two(rq), h.next_power_of_two(rc))
    # ColPali pages (32 query tokens, 1030 patches): 128-token column chunks, queries whole
    colpali = h.maxsim_forward_config(1, 32, 1030, 128, torch.bfloat16)
    assert (colpali.m, colpali.n, colpali.q_chunked, colpali.c_chunked) == (32, 128, False, True)
    # long queries: 64-token row chunks
    long_q = h.gradient_config(96, 64, 128, torch.bfloat16)
    assert (long_q.rq_tile, long_q.rc_tile, long_q.q_chunked, long_q.c_chunked) == (64, 64, True, False)
    assert h.unsupported_reason(5000, 10**6) is None and "2^30" in h.unsupported_reason(1, 2**30)



def test_every_budget_stays_inside_the_tiles_the_gate_compiles():
    """For every budget of the grid (single-tile and chunked), no kernel's tile exceeds (in M,
    N, M*N and, chunked, the carried state M*BLOCK_C) the largest tile of the same kernel, in
    the same branch (chunked or not; with or without row chunks), that the gate verifies."""
    from metaembed_kernels.triton import verify

    kinds = {"fwd": "maxsim_forward_kernel", "loss": "infonce_forward_kernel", "grad": "grad_query_kernel",
             "hn": "infonce_hard_negatives_forward_kernel", "hn-bwd": "own_candidates_backward_kernel",
             "paired": "maxsim_paired_forward_kernel"}
    largest = {}
    for dtype in ALL_DTYPES:
        for rq, rc in verify.SHAPES:
            for _, plan in verify.candidate_plans(dtype, rq, rc, 128):
                cfg = plan.config
                key = (plan.kernel.__name__, dtype, cfg.chunked, cfg.q_chunked)
                old = largest.get(key, (0, 0, 0, 0))
                largest[key] = tuple(max(x, y) for x, y in zip(old, (cfg.m, cfg.n, cfg.m * cfg.n,
                                                                     cfg.m * cfg.block_c)))
    for kind, cfg, rq, rc, dtype in all_configs():
        m, n, mn, state = largest[(kinds[kind], dtype, cfg.chunked, cfg.q_chunked)]
        assert cfg.m <= m and cfg.n <= n and cfg.m * cfg.n <= mn, (kind, rq, rc, dtype, cfg)
        assert not cfg.chunked or cfg.m * cfg.block_c <= state, (kind, rq, rc, dtype, cfg)


def test_heuristic_table_values_for_the_paper_shapes():
    h = H()
    # one query against a 100k index: a 16-row tile (nothing computed for absent queries)
    single = h.maxsim_forward_config(1, 16, 64, 3584, torch.bfloat16)
    assert (single.m, single.n, single.block_d, single.num_warps) == (16, 128, 64, 4)
    # a query batch: 128 x 128 tiles (the wgmma shape on sm_90)
    batch = h.maxsim_forward_config(1000, 16, 64, 3584, torch.bfloat16)
    assert (batch.block_q, batch.block_c, batch.num_warps) == (8, 2, 8)
    assert h.maxsim_forward_config(1000, 16, 64, 3584, torch.float32).m == 32  # fp32 FMA cap (spills on triton 3.6)
    grad = h.gradient_config(16, 64, 3584, torch.bfloat16)
    assert (grad.m, grad.n, grad.num_warps) == (64, 64, 8)
    assert h.groups_pad(5) == 8 and h.groups_pad(9) == 16
    num = h.numerics(torch.float32)
    assert num["DOT_PRECISION"] == "ieee" and num["SPLIT_FP32_OPERANDS"]
    assert h.numerics(torch.float16)["SCALE_TO_FP16_RANGE"] and not h.numerics(torch.bfloat16)["SCALE_TO_FP16_RANGE"]


def test_compile_gate_covers_every_config_the_heuristics_pick_on_its_grid():
    """The gate compiles a few Nq values; every Nq must map to one of their configs."""
    from metaembed_kernels.triton import launch, verify

    h = H()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rq, rc in verify.SHAPES:
            for d in verify.DIMS:
                plans = verify.candidate_plans(dtype, rq, rc, d)
                # (the launcher adjusts some tiles: launch.own_candidate_config, launch.grad_query_config)
                compiled = {(plan.kernel.__name__, dataclasses.astuple(plan.config)) for _, plan in plans}
                p = launch.make_problem(torch.empty(2, rq, d, dtype=dtype, device="meta"),
                                        torch.empty(2, rc, d, dtype=dtype, device="meta"), [rq], [rc], None, None,
                                        interpret=False)
                picks = {("maxsim_forward_kernel", h.maxsim_forward_config(nq, rq, rc, d, dtype))
                         for nq in range(1, 1100)}
                picks |= {("infonce_forward_kernel", h.infonce_forward_config(rq, rc, d, dtype)),
                          ("grad_query_kernel", launch.grad_query_config(h.gradient_config(rq, rc, d, dtype))),
                          ("grad_candidate_kernel", h.gradient_config(rq, rc, d, dtype)),
                          ("infonce_hard_negatives_forward_kernel", launch.own_candidate_config(p, False)),
                          ("own_candidates_backward_kernel", launch.own_candidate_config(p, True)),
                          ("maxsim_paired_forward_kernel", launch.own_candidate_config(p, False))}
                picks = {(name, dataclasses.astuple(cfg)) for name, cfg in picks}
                assert picks <= compiled, picks - compiled
                # loss-forward state rows: 8 and 16 (more than 8 groups); chunked launches take 8 groups
                loss = [plan for _, plan in plans if plan.kernel.__name__ == "infonce_forward_kernel"]
                pads = {plan.constexprs["GROUPS_PAD"] for plan in loss}
                assert pads == ({8} if loss[0].config.chunked else {8, 16}), pads
    assert any(plan.config.chunked for _, plan in verify.candidate_plans(torch.bfloat16, 32, 1030, 128))


# ---------------------------------------------------------------------------------------
# Compile gate
# ---------------------------------------------------------------------------------------
def _gate_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for real targets
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.gate
def test_compile_gate_passes_for_sm80_and_sm90():
    """`python -m metaembed_kernels.triton.verify`: every launchable configuration, bf16/fp16/
    fp32, D in {128, 3584}, (Rq, Rc) in {(16, 64), (32, 128), (64, 64)} and the chunked budgets
    {(32, 1030), (64, 300), (96, 64), (96, 300)}, compiled for sm_80 and sm_90 with MMA /
    no-spill / shared-memory checks (several minutes on 2 cores with a cold cache).
    METAEMBED_GATE_DTYPES narrows the dtypes (scripts/test_compat.sh: bf16,fp32 on the oldest
    triton, where fp16 would compile bf16's kernels again with another element type)."""
    dtypes = os.environ.get("METAEMBED_GATE_DTYPES", "bf16,fp16,fp32")
    result = subprocess.run(
        [sys.executable, "-m", "metaembed_kernels.triton.verify", "--jobs", "2", "--dtypes", dtypes],
        cwd=REPO, env=_gate_env(), capture_output=True, text=True, timeout=1800,
    )
    out = result.stdout
    assert result.returncode == 0, out[-5000:] + result.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("sm_")]
    assert len(rows) >= 100 and all(line.endswith(" ok") for line in rows), out[-3000:]
    assert {"sm_80", "sm_90"} <= {line.split()[0] for line in rows}
    # The token-chunk branch of every kernel. Rows are deduplicated by what Triton compiles,
    # and only the backward kernels compile row chunks differently (Q_CHUNKED): the forward
    # kernels' (96, 300) launches are the (96, 64) ones, so they need one chunked row each.
    chunked = [r for r in rows if "chunks:" in r]
    for target in ("sm_80", "sm_90"):
        for kernel in ("maxsim forward", "loss forward ", "loss forward hard negatives"):
            assert any(r.startswith(target) and kernel in r for r in chunked), (target, kernel)
        assert any(r.startswith(target) and "paired forward" in r for r in chunked), target
        for kernel in ("maxsim backward dq", "maxsim backward dc", "loss backward dq", "loss backward dc",
                       "loss backward hard negatives dq", "loss backward hard negatives dhn", "paired backward dq",
                       "paired backward dc"):
            for chunks in ("chunks:rc ", "chunks:rq ", "chunks:rq+rc "):
                assert any(r.startswith(target) and kernel in r and chunks in r + " " for r in chunked), \
                    (target, kernel, chunks)
    # The main forward configuration on sm_90 issues wgmma; 16-bit kernels on sm_80 mma.sync.
    main_forward = [r for r in rows if r.startswith("sm_90") and "maxsim forward" in r and "128x128" in r
                    and " fp32 " not in r]
    assert main_forward and all(" wgmma " in r for r in main_forward)
    assert all(" mma.sync " in r for r in rows if r.startswith("sm_80") and " fp32 " not in r)
    # the per-query-candidate kernels: paired forward, both backward passes of paired and loss
    for role in ("paired forward", "paired backward dq", "paired backward dc", "loss backward hard negatives dq",
                 "loss backward hard negatives dhn"):
        for target in ("sm_80", "sm_90"):
            for dtype in (f" {name} " for name in dtypes.split(",")):
                assert any(r.startswith(target) and role in r and dtype in r for r in rows), (role, target, dtype)
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


@pytest.mark.gate
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


Q2, C2 = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
CP2, HN2 = torch.randn(2, 4, 5, 8), torch.randn(2, 1, 5, 8)
LABELS2 = torch.tensor([0, 1])
BOOL = dict(dtype=torch.bool)
# (op family, arguments) of bad direct op calls; every backend must raise the same error.
BAD_OP_CALLS = [
    ("maxsim_grouped", (Q2, C2, [4], [1], None, None)),  # r_q > Rq would read past each query
    ("maxsim_grouped", (Q2, C2, [1], [0], None, None)),
    ("maxsim_grouped", (Q2, C2, [1, 2], [1], None, None)),
    ("maxsim_grouped", (Q2, C2, [], [], None, None)),
    ("maxsim_grouped", (Q2, C2, [1], [1], None, torch.ones(4, 4, **BOOL))),
    ("maxsim_grouped", (Q2, C2, [1], [1], torch.ones(2, 3), None)),
    ("maxsim_grouped", (Q2, C2[:, :, :4], [1], [1], None, None)),
    ("maxsim_grouped", (Q2, C2.half(), [1], [1], None, None)),
    ("maxsim_grouped", (Q2[0], C2, [1], [1], None, None)),
    ("maxsim_paired_grouped", (Q2, torch.randn(3, 4, 5, 8), [1], [1], None, None)),  # B mismatch
    ("maxsim_paired_grouped", (Q2, C2, [1], [1], None, None)),  # c not 4-D
    ("maxsim_paired_grouped", (Q2, CP2, [1], [6], None, None)),
    ("maxsim_paired_grouped", (Q2, CP2, [1], [1], None, torch.ones(2, 4, **BOOL))),
    ("maxsim_paired_grouped_backward", (torch.randn(1, 2, 3), Q2, CP2, [1], [1], None, None, [True, True])),
    ("maxsim_grouped_backward", (torch.randn(1, 4, 2), Q2, C2, [1], [1], None, None, [True, True])),
    ("matryoshka_infonce", (Q2, C2, torch.randn(2, 1, 4, 8), LABELS2, [1], [1], 1.0, None, None, None)),
    ("matryoshka_infonce", (Q2, C2, HN2, torch.tensor([0, 4]), [1], [1], 1.0, None, None, None)),  # label >= Nc
    ("matryoshka_infonce", (Q2, C2, HN2, torch.tensor([-1, 0]), [1], [1], 1.0, None, None, None)),
    ("matryoshka_infonce", (Q2, C2, HN2, LABELS2.int(), [1], [1], 1.0, None, None, None)),
    ("matryoshka_infonce", (Q2, C2, HN2, LABELS2, [1], [1], -1.0, None, None, None)),
    ("matryoshka_infonce", (Q2, C2, HN2, LABELS2, [1], [1], 1.0, None, None, torch.ones(2, 1, 4, **BOOL))),
    ("matryoshka_infonce_backward", (torch.randn(1, 3), torch.randn(1, 2), Q2, C2, HN2, LABELS2, [1], [1], 1.0,
                                     None, None, None, [True, True, True])),
    ("matryoshka_infonce_backward", (torch.randn(1, 2), torch.randn(1, 2), Q2, C2, HN2, torch.tensor([0, 9]), [1],
                                     [1], 1.0, None, None, None, [True, True, True])),
]


def _raised(call):
    try:
        call()
    except Exception as err:  # noqa: BLE001 -- the test compares what was raised
        return type(err), str(err)
    return None


@interpreter
@pytest.mark.parametrize("family,args", BAD_OP_CALLS, ids=[f"{f}-{k}" for k, (f, _) in enumerate(BAD_OP_CALLS)])
def test_bad_direct_op_calls_raise_what_the_reference_backend_raises(family, args):
    """The triton ops check their arguments with the shared validator: the same exception type
    and message as the reference backend's ops (which every backend is tested against)."""
    triton_error = _raised(lambda: getattr(torch.ops.metaembed, f"triton_{family}")(*args))
    reference_error = _raised(lambda: getattr(torch.ops.metaembed, f"reference_{family}")(*args))
    assert reference_error is not None and reference_error[0] in (ValueError, TypeError), reference_error
    assert triton_error == reference_error


@interpreter
def test_what_only_triton_refuses():
    q, c = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 on the triton backend"):
        triton_ops().triton_maxsim_grouped(q.double(), c.double(), [1], [1], None, None)
    from metaembed_kernels.triton import launch

    with pytest.raises(ValueError, match="2\\^30"):  # token indices are int32: absurd budgets fail clearly
        launch.make_problem(torch.empty(1, 2**30, 8, device="meta"), torch.empty(2, 3, 8, device="meta"),
                            [2**30], [1], None, None, interpret=False)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of t in a given memory layout (what a caller may pass to an op)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # leading two dims swapped in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # every other element of a twice-as-wide last dim
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded":  # stride 0 along the first dim: every item is item 0
        return t[:1].expand(t.shape)
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


@interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_triton_ops(layout):
    """torch.library.opcheck (schema, fake kernel strides, autograd registration, AOT dispatch)
    on every triton op family with inputs of any layout."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if layout == "sliced" else torch.float32
    q = _laid_out(torch.randn(3, 3, 16, generator=gen).to(dtype), layout).requires_grad_()
    c = _laid_out(torch.randn(4, 5, 16, generator=gen).to(dtype), layout).requires_grad_()
    cp = _laid_out(torch.randn(3, 2, 5, 16, generator=gen).to(dtype), layout).requires_grad_()
    hn = _laid_out(torch.randn(3, 1, 5, 16, generator=gen).to(dtype), layout).requires_grad_()
    qm, cm = torch.rand(3, 3, generator=gen) > 0.2, torch.rand(4, 5, generator=gen) > 0.2
    cpm = torch.rand(3, 2, 5, generator=gen) > 0.2
    rq, rc = [1, 3, 2], [1, 2, 5]
    ops = triton_ops()
    torch.library.opcheck(ops.triton_maxsim_paired_grouped.default, (q, cp, rq, rc, qm, cpm))
    torch.library.opcheck(ops.triton_maxsim_paired_grouped_backward.default,
                          (torch.randn(3, 3, 2, generator=gen), q.detach(), cp.detach(), rq, rc, qm, cpm, [True, True]))
    if layout not in ("contiguous", "transposed"):
        return  # the in-batch ops share make_problem's layout handling; two layouts keep the suite short
    torch.library.opcheck(ops.triton_maxsim_grouped.default, (q, c, rq, rc, qm, cm))
    grad = torch.randn(3, 3, 4, generator=gen)
    torch.library.opcheck(ops.triton_maxsim_grouped_backward.default,
                          (grad, q.detach(), c.detach(), rq, rc, qm, cm, [True, False]))
    labels = torch.tensor([1, 3, 0])
    torch.library.opcheck(ops.triton_matryoshka_infonce.default, (q, c, hn, labels, rq, rc, 2.5, qm, cm, None))
    terms, lse, _ = ops.triton_matryoshka_infonce(q.detach(), c.detach(), hn.detach(), labels, rq, rc, 2.5, qm, cm,
                                                  None)
    torch.library.opcheck(ops.triton_matryoshka_infonce_backward.default,
                          (torch.randn(3, 3, generator=gen), lse, q.detach(), c.detach(), hn.detach(), labels,
                           rq, rc, 2.5, qm, cm, None, [False, True, True]))


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


# ---------------------------------------------------------------------------------------
# Interpreter: token chunks (budgets beyond one tile)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    """Token tiles shrunk to 16 x 16: tiny budgets then cross many chunk boundaries in both
    r_q and r_c (same kernels and launchers; only the heuristic table's caps change)."""
    h = H()
    monkeypatch.setattr(h, "MAX_RQ_TILE", 16)
    monkeypatch.setattr(h, "MAX_RC_TILE", 16)
    monkeypatch.setattr(h, "MAX_TOKEN_TILE", 256)


def _late_masks(nq, rq, nc, rc, gen, i_late, j_late):
    """random_masks (query 1 and candidate nc // 2 fully masked; candidate 0's only valid token
    is its last), plus query 0 and candidate 1 whose valid tokens all lie at i >= i_late /
    j >= j_late: a later row / column chunk, so short prefixes see none."""
    q_mask, c_mask = random_masks(nq, rq, nc, rc, gen)
    q_mask[0, :i_late] = False
    q_mask[0, i_late] = True
    c_mask[1, :j_late] = False
    c_mask[1, j_late] = True
    return q_mask, c_mask


def _check_maxsim_against_reference(q, c, groups, q_mask, c_mask, gen):
    q_k, c_k = q.clone().requires_grad_(), c.clone().requires_grad_()
    out = maxsim_grouped(q_k, c_k, groups, q_mask=q_mask, c_mask=c_mask, backend="triton")
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out, expected, score_tolerance(q, c, groups), "scores")
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    dq_ref, dc_ref = _reference_grads(q, c, groups, grad, q_mask, c_mask)
    g = grad.abs().max().item()
    n_q, n_c = c.shape[0] * len(groups), q.shape[0] * q.shape[1] * len(groups)
    assert_close(q_k.grad, dq_ref, grad_tolerance(dq_ref, q.dtype, n_q, g * c.abs().max()), "dq")
    assert_close(c_k.grad, dc_ref, grad_tolerance(dc_ref, q.dtype, n_c, g * q.abs().max()), "dc")
    return out


# (Rq, Rc, late row / column chunk, groups, dtype) at the production chunk sizes
CHUNKED_BUDGETS = [
    # r_c chunked (128-token column chunks), prefixes ending before, at and past a boundary
    pytest.param(3, 200, 1, 140, ((3, 200), (1, 1), (2, 128), (3, 129), (1, 150)), torch.bfloat16, id="rc-bf16"),
    # r_q chunked (64-token row chunks)
    pytest.param(70, 5, 64, 2, ((70, 5), (1, 1), (64, 3), (65, 2), (70, 1)), torch.float16, id="rq-fp16"),
    # both: 64 x 64 token tiles, 2 row chunks x 3 column chunks
    pytest.param(66, 130, 64, 64, ((66, 130), (1, 1), (64, 64), (65, 65), (2, 129)), torch.float32, id="rq+rc-fp32"),
]


@interpreter
@pytest.mark.parametrize("rq,rc,i_late,j_late,groups,dtype", CHUNKED_BUDGETS)
def test_chunked_budgets_match_reference(rq, rc, i_late, j_late, groups, dtype):
    """Scores and gradients past one tile (exact inputs: the argmax decisions match the
    float64 reference exactly), with masks whose valid tokens lie in a later chunk only."""
    from metaembed_kernels.triton import heuristics

    assert heuristics.gradient_config(rq, rc, 16, dtype).chunked
    gen = torch.Generator().manual_seed(rq + rc)
    q, c = exact_values((3, rq, 12), gen, dtype), exact_values((4, rc, 12), gen, dtype)
    q_mask, c_mask = _late_masks(3, rq, 4, rc, gen, i_late, j_late)
    _check_maxsim_against_reference(q, c, groups, q_mask, c_mask, gen)


@interpreter
@pytest.mark.parametrize("rq,rc,i_late,j_late,groups,dtype", CHUNKED_BUDGETS)
def test_chunked_budgets_loss_matches_reference(rq, rc, i_late, j_late, groups, dtype):
    """Fused loss with hard negatives past one tile: forward (online LSE over chunked scores),
    dq / dc passes (the row-chunked one recomputes the scores first) and hard negatives."""
    x = _loss_case(nq=3, nc=4, rq=rq, rc=rc, d=12, k=2, groups=groups, dtype=dtype, seed=rq * rc)
    gen = torch.Generator().manual_seed(7)
    x["q_mask"], x["c_mask"] = _late_masks(3, rq, 4, rc, gen, i_late, j_late)
    x["hn_mask"][0, 0, :j_late] = False
    _check_loss_against_reference(x, groups, temperature=_moderate_temperature(x, groups))


def _moderate_temperature(x, groups):
    """A temperature keeping |logits| <= 16: long queries sum many maxima (scores in the
    hundreds here), and fp32 logits of size L are only L * 2^-24 accurate -- whatever the
    kernel -- which the fixed gradient tolerances of _check_loss_against_reference assume small."""
    q = x["q"].double()
    everything = torch.cat([x["c"], x["hn"].flatten(0, 1)]).double()
    largest = reference.maxsim_grouped(q, everything, groups).abs().max().item()
    return max(0.2, largest / 16)


MANY_GROUPS = ((37, 50), (1, 1), (16, 16), (17, 33), (32, 48), (33, 17), (5, 49), (36, 1), (16, 32), (2, 16))


@interpreter
def test_many_chunk_boundaries_and_group_batches(small_chunks):
    """16 x 16 token tiles: (37, 50) spans 3 row x 4 column chunks; 10 groups with prefixes on
    and around the boundaries run as two launches (8 + 2 groups); several queries and
    candidates share a chunked tile. (bf16: fp32 chunks are covered at production sizes.)"""
    from metaembed_kernels.triton import heuristics

    dtype = torch.bfloat16

    fwd = heuristics.maxsim_forward_config(3, 37, 50, 8, dtype)
    assert fwd.q_chunked and fwd.c_chunked and fwd.block_q > 1 and fwd.block_c > 1, fwd
    gen = torch.Generator().manual_seed(3)
    q, c = exact_values((3, 37, 8), gen, dtype), exact_values((5, 50, 8), gen, dtype)
    q_mask, c_mask = _late_masks(3, 37, 5, 50, gen, 20, 35)
    _check_maxsim_against_reference(q, c, MANY_GROUPS, q_mask, c_mask, gen)
    x = _loss_case(nq=3, nc=5, rq=37, rc=50, d=8, k=2, groups=MANY_GROUPS, dtype=dtype, seed=4)
    _check_loss_against_reference(x, MANY_GROUPS, temperature=_moderate_temperature(x, MANY_GROUPS),
                                  weights=tuple(0.5 + 0.1 * i for i in range(10)))


@interpreter
@pytest.mark.parametrize("small", [False, True], ids=["chunks128", "chunks16"])
def test_ties_across_chunk_boundaries_go_to_the_lowest_index(small, request):
    """Every query token is e_0, so S[i, j] = c[j, 0]; candidate tokens lo < hi < hi2 in three
    different column chunks tie for the maximum. The gradient of the max (MaxSim and loss,
    in-batch and hard negatives) must go to lo alone, as in the reference; a group whose
    prefix ends inside the second chunk sees the tie lo / hi only."""
    if small:
        request.getfixturevalue("small_chunks")
    lo, hi, hi2, rc = (5, 20, 37, 40) if small else (5, 130, 260, 270)
    gen = torch.Generator().manual_seed(6)
    q = torch.zeros(2, 3, 8)
    q[:, :, 0] = 1.0
    c = exact_values((3, rc, 8), gen) / 2  # |c| <= 1/2
    c[:, [lo, hi, hi2], :] = c[:, lo:lo + 1, :]  # identical tokens: a 3-way tie ...
    c[:, [lo, hi, hi2], 0] = 1.0  # ... at the maximum
    groups = ((3, rc), (2, hi + 1), (1, hi), (3, 1))
    out = _check_maxsim_against_reference(q, c, groups, None, None, gen)
    assert torch.all(out[0] == 3.0) and torch.all(out[1] == 2.0) and torch.all(out[2] == 1.0)
    c_k = c.clone().requires_grad_()
    (dc,) = torch.autograd.grad(maxsim_grouped(q, c_k, groups, backend="triton").sum(), (c_k,))
    assert torch.all(dc[:, lo, 0] == 2 * (3 + 2 + 1)) and torch.all(dc[:, [hi, hi2]] == 0)  # 2 queries
    x = dict(q=q, c=c, hn=c[:2].unsqueeze(1).clone(), labels=torch.tensor([2, 0]))
    _check_loss_against_reference(x, groups)
    q_k, c_k, hn_k = q.clone().requires_grad_(), c.clone().requires_grad_(), x["hn"].clone().requires_grad_()
    matryoshka_infonce(q_k, c_k, groups, hard_negatives=hn_k, labels=x["labels"], backend="triton").backward()
    assert c_k.grad[:, lo].abs().sum() > 0 and hn_k.grad[:, :, lo].abs().sum() > 0
    assert torch.all(c_k.grad[:, [hi, hi2]] == 0) and torch.all(hn_k.grad[:, :, [hi, hi2]] == 0)


@interpreter
def test_chunked_tokens_beyond_the_largest_group_are_never_read():
    """NaN past max r_q / max r_c changes nothing at chunked budgets either."""
    gen = torch.Generator().manual_seed(10)
    q, c = normal_values((2, 72, 8), gen), normal_values((3, 140, 8), gen)
    groups = ((66, 3), (1, 130), (2, 129))
    q_nan, c_nan = q.clone(), c.clone()
    q_nan[:, 66:] = float("nan")
    c_nan[:, 130:] = float("nan")
    q_nan.requires_grad_()
    c_nan.requires_grad_()
    out = maxsim_grouped(q_nan, c_nan, groups, backend="triton")
    assert_close(out, reference.maxsim_grouped(q.double(), c.double(), groups), score_tolerance(q, c, groups), "scores")
    out.sum().backward()
    assert torch.isfinite(q_nan.grad).all() and torch.all(q_nan.grad[:, 66:] == 0)
    assert torch.isfinite(c_nan.grad).all() and torch.all(c_nan.grad[:, 130:] == 0)


# ---------------------------------------------------------------------------------------
# Interpreter: paired MaxSim (each query against its own candidates)
# ---------------------------------------------------------------------------------------
def _paired_masks(b, rq, n, rc, gen):
    """Per-query candidate masks in the spirit of random_masks: ~35% invalid tokens (not
    prefixes), query b // 2 fully masked (if b > 1), candidate (0, n // 2) fully masked, and candidate
    (b - 1, 0) whose only valid token is its last (short prefixes see none)."""
    q_mask = torch.rand(b, rq, generator=gen) > 0.35
    c_mask = torch.rand(b, n, rc, generator=gen) > 0.35
    if b > 1:  # (a single query keeps its tokens)
        q_mask[b // 2] = False
    c_mask[0, n // 2] = False
    c_mask[b - 1, 0] = False
    c_mask[b - 1, 0, -1] = True
    return q_mask, c_mask


def _check_paired_against_reference(q, c, groups, q_mask, c_mask, gen, grads=True):
    """Scores (and, with exact inputs, gradients) of the triton paired op against the float64
    reference (autograd through reference.maxsim_grouped_paired)."""
    q_k, c_k = q.clone().requires_grad_(grads), c.clone().requires_grad_(grads)
    out = maxsim_paired_grouped(q_k, c_k, groups, q_mask=q_mask, c_mask=c_mask, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (len(groups), q.shape[0], c.shape[1])
    q_r, c_r = q.double().requires_grad_(grads), c.double().requires_grad_(grads)
    expected = reference.maxsim_grouped_paired(q_r, c_r, groups, q_mask, c_mask)
    magnitude = reference.maxsim_grouped_paired(q.double().abs(), c.double().abs(), groups)
    tolerance = 4 * (q.shape[-1] + max(g[0] for g in groups)) * UNIT_ROUNDOFF[torch.float32] * magnitude + 1e-30
    assert_close(out, expected, tolerance, f"paired scores {groups}")
    if grads:
        grad = torch.randn(out.shape, generator=gen)
        out.backward(grad)
        expected.backward(grad.double())
        g = grad.abs().max().item()
        n_q, n_c = c.shape[1] * len(groups), q.shape[1] * len(groups)  # terms per dq / dc element
        assert_close(q_k.grad, q_r.grad, grad_tolerance(q_r.grad, q.dtype, n_q, g * c.abs().max()), "paired dq")
        assert_close(c_k.grad, c_r.grad, grad_tolerance(c_r.grad, q.dtype, n_c, g * q.abs().max()), "paired dc")
    return out


# Every Rq, Rc and D value of the sweep, and B, N in {1, 3, 17}, in six cases (k % 5 == 0
# walks the three axes independently; the interpreter is slow).
PAIRED_CASES = [pytest.param(case, id=str(case)) for k, case in enumerate(sweep_cases()) if k % 5 == 0]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PAIRED_CASES)
def test_paired_matches_reference_over_the_sweep(case, dtype):
    """B = Nq queries, each against its own N = Nc candidates: odd sizes, D not a multiple of
    16, 1-token prefixes, non-prefix masks with empty rows; scores on random inputs, then
    scores and gradients on exact inputs (argmax decisions, ties included, as the reference)."""
    gen = torch.Generator().manual_seed(case.seed)
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    masks = _paired_masks(case.nq, case.rq, case.nc, case.rc, gen) if case.masked else (None, None)
    shape_q, shape_c = (case.nq, case.rq, case.d), (case.nq, case.nc, case.rc, case.d)
    _check_paired_against_reference(normal_values(shape_q, gen, dtype), normal_values(shape_c, gen, dtype), groups,
                                    *masks, gen, grads=False)
    _check_paired_against_reference(exact_values(shape_q, gen, dtype), exact_values(shape_c, gen, dtype), groups,
                                    *masks, gen)


@interpreter
@pytest.mark.parametrize("rq,rc,i_late,j_late,groups,dtype", CHUNKED_BUDGETS)
def test_paired_chunked_budgets_match_reference(rq, rc, i_late, j_late, groups, dtype):
    """Paired scores and gradients past one tile, with valid tokens only in a later chunk."""
    gen = torch.Generator().manual_seed(rq * rc + 1)
    q, c = exact_values((3, rq, 12), gen, dtype), exact_values((3, 2, rc, 12), gen, dtype)
    q_mask, c_mask = _paired_masks(3, rq, 2, rc, gen)
    q_mask[0, :i_late] = False
    q_mask[0, i_late] = True
    c_mask[1, 0, :j_late] = False
    c_mask[1, 0, j_late] = True
    _check_paired_against_reference(q, c, groups, q_mask, c_mask, gen)


@interpreter
def test_paired_many_chunk_boundaries_and_group_batches(small_chunks):
    """16 x 16 token tiles, 10 groups around the chunk boundaries (two launches: 8 + 2, adding
    into the same gradients), several candidates per chunked tile."""
    from metaembed_kernels.triton import heuristics

    assert heuristics.hard_negative_config(37, 50, 8, torch.bfloat16, backward=True).chunked
    gen = torch.Generator().manual_seed(12)
    q, c = exact_values((2, 37, 8), gen, torch.bfloat16), exact_values((2, 3, 50, 8), gen, torch.bfloat16)
    q_mask, c_mask = _paired_masks(2, 37, 3, 50, gen)
    _check_paired_against_reference(q, c, MANY_GROUPS, q_mask, c_mask, gen)


@interpreter
def test_paired_equals_in_batch_scores_of_each_query():
    """maxsim_paired_grouped(q, c)[g, a, n] is maxsim_grouped(q[a:a+1], c[a])[g, 0, n] (exact
    inputs: equal whatever the tiles' summation order) -- N = 1 gives aligned pairs."""
    gen = torch.Generator().manual_seed(13)
    q, c = exact_values((3, 5, 20), gen), exact_values((3, 1, 7, 20), gen)
    groups = ((1, 1), (5, 7), (2, 3))
    paired = maxsim_paired_grouped(q, c, groups, backend="triton")
    for a in range(3):
        assert torch.equal(paired[:, a], maxsim_grouped(q[a:a + 1], c[a], groups, backend="triton")[:, 0])


# ---------------------------------------------------------------------------------------
# Interpreter: output_mask -- nothing allocated or launched for an unwanted gradient
# ---------------------------------------------------------------------------------------
MASKS2 = list(itertools.product((False, True), repeat=2))
MASKS3 = list(itertools.product((False, True), repeat=3))


def _small_problem_inputs(dtype=torch.float32, seed=14):
    gen = torch.Generator().manual_seed(seed)
    x = dict(q=exact_values((3, 5, 12), gen, dtype), c=exact_values((4, 7, 12), gen, dtype),
             cp=exact_values((3, 2, 7, 12), gen, dtype), hn=exact_values((3, 2, 7, 12), gen, dtype),
             labels=torch.tensor([1, 3, 0]), gen=gen)
    x["q_mask"], x["c_mask"] = random_masks(3, 5, 4, 7, gen)
    x["cp_mask"] = _paired_masks(3, 5, 2, 7, gen)[1]
    x["hn_mask"] = torch.rand(3, 2, 7, generator=gen) > 0.3
    return x


@interpreter
def test_output_mask_plans_allocate_and_launch_only_the_wanted_gradients():
    from metaembed_kernels.triton import kernels as K
    from metaembed_kernels.triton import launch

    x = _small_problem_inputs()
    rq, rc, g = [1, 5, 2], [1, 7, 3], 3
    p = launch.make_problem(x["q"], x["c"], rq, rc, x["q_mask"], x["c_mask"])
    for mask in MASKS2:
        dq, dc, plans = launch.plan_maxsim_backward(p, torch.zeros(g, 3, 4), mask)
        assert (dq is not None, dc is not None) == mask
        assert [plan.kernel for plan in plans] == [K.grad_query_kernel] * mask[0] + [K.grad_candidate_kernel] * mask[1]
    pp = launch.make_problem(x["q"], x["cp"], rq, rc, x["q_mask"], x["cp_mask"], paired=True)
    for mask in MASKS2:
        dq, dc, plans = launch.plan_maxsim_paired_backward(pp, torch.zeros(g, 3, 2), mask)
        assert (dq is not None, dc is not None) == mask
        assert [plan.constexprs["OUTPUT"] for plan in plans] == ["dq"] * mask[0] + ["dx"] * mask[1]
        assert all(plan.kernel is K.own_candidates_backward_kernel for plan in plans)
    h = launch.make_hard_negatives(p, x["hn"], x["hn_mask"])
    for mask in MASKS3:
        dq, dc, dhn, plans = launch.plan_infonce_backward(p, h, x["labels"], 2.0, torch.zeros(g, 3),
                                                          torch.zeros(g, 3), mask)
        assert (dq is not None, dc is not None, dhn is not None) == mask
        expected = [(K.grad_query_kernel, None)] * mask[0] + [(K.grad_candidate_kernel, None)] * mask[1] + \
            [(K.own_candidates_backward_kernel, "dq")] * mask[0] + [(K.own_candidates_backward_kernel, "dx")] * mask[2]
        assert [(plan.kernel, plan.constexprs.get("OUTPUT")) for plan in plans] == expected


@interpreter
@pytest.mark.parametrize("family", ["maxsim", "paired", "loss"])
def test_output_mask_returns_exactly_the_wanted_gradients(family):
    """Every output_mask of each backward op: a wanted gradient is bitwise the one of the full
    call (no pass depends on another's work), an unwanted one the (0,) placeholder of the
    input's dtype."""
    x = _small_problem_inputs(torch.bfloat16)
    ops, rq, rc = torch.ops.metaembed, [1, 5, 2], [1, 7, 3]
    gen = x["gen"]
    if family == "loss":
        inputs = (x["q"], x["c"], x["hn"])
        _, lse, _ = ops.triton_matryoshka_infonce(x["q"], x["c"], x["hn"], x["labels"], rq, rc, 2.0, x["q_mask"],
                                               x["c_mask"], x["hn_mask"])
        grad = torch.randn(3, 3, generator=gen)
        call = lambda mask: ops.triton_matryoshka_infonce_backward(  # noqa: E731
            grad, lse, *inputs, x["labels"], rq, rc, 2.0, x["q_mask"], x["c_mask"], x["hn_mask"], list(mask))
        masks = MASKS3
    else:
        c, c_mask = (x["cp"], x["cp_mask"]) if family == "paired" else (x["c"], x["c_mask"])
        op = ops.triton_maxsim_paired_grouped_backward if family == "paired" else ops.triton_maxsim_grouped_backward
        inputs = (x["q"], c)
        grad = torch.randn(3, 3, c.shape[1] if family == "paired" else 4, generator=gen)
        call = lambda mask: op(grad, *inputs, rq, rc, x["q_mask"], c_mask, list(mask))  # noqa: E731
        masks = MASKS2
    full = call((True,) * len(inputs))
    assert all(t.abs().sum() > 0 for t in full)
    for mask in masks:
        for got, whole, wanted, like in zip(call(mask), full, mask, inputs):
            if wanted:
                assert torch.equal(got, whole) and got.is_contiguous(), (family, mask)
            else:
                assert got.shape == (0,) and got.dtype == like.dtype, (family, mask)


# ---------------------------------------------------------------------------------------
# Non-finite values (the op contract): interpreter here, compiled code on a GPU
# ---------------------------------------------------------------------------------------
BIG = 1e20  # BIG * BIG overflows fp32: +-inf similarities from finite (fp32 / bf16) inputs
DEVICES = [pytest.param("cpu", marks=interpreter),
           pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]


def _special_case(dtype, rq, rc, spots, paired_k, in_batch_nan=True, seed=15):
    """Inputs whose similarities are set token by token. D = 2: q[a, i] = (1, y_a), c[b, j] =
    (u, v), so S = u + y_a v, with y_0 = BIG (query 0 sees infinities), y_a = 0 otherwise
    (BIG = 0 for fp16, which cannot hold it), and u exact multiples of 1/4 unless set:

        candidate 0: every token v = -BIG: S = -inf for query 0 (an all -inf prefix);
        candidate 1: u = NaN at j = spots["late_nan"]: a NaN in a later chunk than the max;
        candidate 2: token 0 masked and holding NaN / inf, token 1 v = +BIG (S = +inf, query 0);
        candidate 3: valid only from j = spots["first"] on, where v = -BIG: the first valid
                     token is -inf (taken: validity comes from the masks);
        candidate 4: u = NaN at j = 1 and at spots["late_nan"], u = 2 (the largest finite)
                     at j = rc - 1: the early NaN sticks, its index is the argmax;
        candidate 5: plain values.
    Query 1's last token is masked and holds NaN / inf; query 2's token 1 has u = NaN (a NaN row,
    valid). In-batch candidates c (6, rc, 2) (without the NaN of candidates 1 and 4 unless
    in_batch_nan: a NaN in-batch candidate makes every query's loss NaN); paired c and hard
    negatives (3, paired_k, rc, 2) hold candidates (a + k) % 6 for query a."""
    gen = torch.Generator().manual_seed(seed)
    big = 0.0 if dtype == torch.float16 else BIG
    nan, inf = float("nan"), float("inf")
    q = torch.zeros(3, rq, 2)
    q[:, :, 0] = 1.0
    q[0, :, 1] = big
    q[2, min(1, rq - 1), 0] = nan
    q_mask = torch.ones(3, rq, dtype=torch.bool)
    if rq > 1:
        q_mask[1, -1] = False
        q[1, -1] = torch.tensor([nan, inf])
    c = torch.zeros(6, rc, 2)
    c[:, :, 0] = exact_values((6, rc), gen)
    c_mask = torch.ones(6, rc, dtype=torch.bool)
    c[0, :, 0], c[0, :, 1] = 0.0, -big
    c[1, spots["late_nan"] % rc, 0] = nan
    c[2, 0] = torch.tensor([nan, inf])
    c_mask[2, 0] = False
    if rc > 1:
        c[2, 1] = torch.tensor([0.0, big])
    first = spots["first"] % rc
    c[3, :first] = torch.tensor([inf, nan])
    c_mask[3, :first] = False
    c[3, first] = torch.tensor([0.0, -big])
    c[4, 1 % rc, 0] = nan
    c[4, spots["late_nan"] % rc, 0] = nan
    c[4, -1, 0] = 2.0
    own = torch.tensor([[(a + k) % 6 for k in range(paired_k)] for a in range(3)])
    in_batch = c.clone()
    if not in_batch_nan:
        in_batch[[1, 4], :, 0] = torch.nan_to_num(in_batch[[1, 4], :, 0], nan=0.5)
    return dict(q=q.to(dtype), c=in_batch.to(dtype), q_mask=q_mask, c_mask=c_mask, own_c=c[own].to(dtype),
                own_mask=c_mask[own], labels=torch.tensor([3, 5, 1]))


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements, per last-dim channel (the channels hold values of very
    different sizes: 1 and BIG)."""
    return torch.where(torch.isfinite(x), x.abs(), 0).double().flatten(0, -2).amax(0)


def _gradient_atol(weight_sums: torch.Tensor, other: torch.Tensor, ndim: int) -> torch.Tensor:
    """fp32 accumulation bound of a gradient element sum_j W_j x_j: a few u32 of
    sum_j |W_j| * max |x| (per channel), where the sum of |W| over the element's terms is
    weight_sums (one number per item, broadcast over its tokens); terms that cancel (a
    softmax summing to 1 against a BIG channel) make the result itself that noisy."""
    w = weight_sums.double().reshape(*weight_sums.shape, *([1] * (ndim - weight_sums.dim())))
    return 8 * UNIT_ROUNDOFF[torch.float32] * w * _channel_max(other)


def _assert_same_non_finite(got, expected, name, rtol, atol=None):
    """NaN, +inf and -inf at exactly the same positions; the finite values close (atol: by
    default relative to the largest finite value per last-dim channel)."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    assert got.shape == expected.shape, name
    for what, where in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                        ("-inf", lambda t: t == float("-inf"))):
        differ = where(got) != where(expected)
        assert not differ.any(), f"{name}: {what} differs at {differ.nonzero()[:6].tolist()}"
    finite = torch.isfinite(expected)
    if atol is None:
        atol = 1e-5 * (_channel_max(expected) if expected.dim() > 1 else _channel_max(expected[:, None]))
    assert_close(torch.where(finite, got, 0), torch.where(finite, expected, 0), atol + 1e-30, name, rtol=rtol)


SINGLE_TILE = (3, 7, dict(late_nan=5, first=3), ((1, 1), (3, 7), (2, 4), (3, 5), (1, 6), (2, 2)), False)
# 16 x 16 tiles (small_chunks): 2 row chunks x 3 column chunks; prefixes ending in each of them
CHUNKED = (17, 34, dict(late_nan=20, first=17), ((1, 1), (17, 34), (17, 18), (3, 20), (16, 21), (17, 33)), True)


def _special_params(dtypes, dtypes_chunked):
    """Single tile on `dtypes`; the chunked tiles (slow in the interpreter) on a subset."""
    out = [pytest.param(*SINGLE_TILE, dtype, id=f"single-tile-{dtype_id(dtype)}") for dtype in dtypes]
    return out + [pytest.param(*CHUNKED, dtype, id=f"chunked-{dtype_id(dtype)}") for dtype in dtypes_chunked]


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rq,rc,spots,groups,chunked,dtype", _special_params((torch.float32, torch.bfloat16, torch.float16),
                                                                         (torch.float32, torch.bfloat16)))
def test_non_finite_scores_and_gradients_follow_the_reference(device, rq, rc, spots, groups, chunked, dtype, request):
    """maxsim_grouped and maxsim_paired_grouped, forward and backward, against the reference
    (which implements the contract) at the input dtype (fp32 compute: BIG * BIG overflows as
    in the kernels): NaN / +-inf at exactly the reference's positions."""
    if chunked:
        request.getfixturevalue("small_chunks")
    x = _special_case(dtype, rq, rc, spots, paired_k=4)
    rtol = 1e-5 if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype]
    rq_list, rc_list = [g[0] for g in groups], [g[1] for g in groups]
    ops = triton_ops()
    gen = torch.Generator().manual_seed(16)
    for paired, c, c_mask in ((False, x["c"], x["c_mask"]), (True, x["own_c"], x["own_mask"])):
        q, cc, qm, cm = _on(device, x["q"], c, x["q_mask"], c_mask)
        fwd = ops.triton_maxsim_paired_grouped if paired else ops.triton_maxsim_grouped
        bwd = ops.triton_maxsim_paired_grouped_backward if paired else ops.triton_maxsim_grouped_backward
        ref = reference.maxsim_grouped_paired if paired else reference.maxsim_grouped
        kind = "paired" if paired else "in-batch"
        scores = fwd(q, cc, rq_list, rc_list, qm, cm)[0]
        expected = ref(x["q"], c, groups, x["q_mask"], c_mask)
        assert expected.isnan().any() and (expected == float("-inf")).any() != (dtype == torch.float16)
        _assert_same_non_finite(scores, expected, f"{kind} scores", rtol=1e-6)
        grad = torch.randn(expected.shape, generator=gen)
        dq, dc = bwd(grad.to(device), q, cc, rq_list, rc_list, qm, cm, [True, True])
        dq_ref, dc_ref = reference.scores_backward(grad, x["q"], c, groups, x["q_mask"], c_mask, paired)
        assert dq_ref.isnan().any() and dc_ref.isnan().any()
        per_query = grad.abs().sum((0, 2))  # sum of |dS| over one query's terms
        per_candidate = grad.abs().sum(0) if paired else grad.abs().sum((0, 1))
        _assert_same_non_finite(dq, dq_ref, f"{kind} dq", rtol, _gradient_atol(per_query, c, 3))
        _assert_same_non_finite(dc, dc_ref, f"{kind} dc", rtol, _gradient_atol(per_candidate, x["q"], c.dim()))
        # masked tokens: exactly zero gradients, whatever they hold
        assert torch.all(dq.cpu()[~x["q_mask"]] == 0) and torch.all(dc.cpu()[~c_mask] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rq,rc,spots,groups,chunked,dtype", _special_params((torch.float32, torch.bfloat16),
                                                                         (torch.float32,)))
def test_non_finite_loss_follows_the_reference(device, rq, rc, spots, groups, chunked, dtype, request):
    """The fused loss with hard negatives on the same inputs: logits -inf (a prefix of -inf
    similarities; query 0's positive in short groups: terms = +inf), +inf (lse = +inf) and NaN
    (lse NaN), in-batch and in the hard negatives: terms, lse and every gradient have NaN / inf
    where the reference (torch.logsumexp semantics) has them."""
    if chunked:
        request.getfixturevalue("small_chunks")
    x = _special_case(dtype, rq, rc, spots, paired_k=2, in_batch_nan=False)
    rq_list, rc_list = [g[0] for g in groups], [g[1] for g in groups]
    q, c, hn, labels, qm, cm, hm = _on(device, x["q"], x["c"], x["own_c"], x["labels"], x["q_mask"], x["c_mask"],
                                      x["own_mask"])
    scale = 0.5
    terms, lse, _ = triton_ops().triton_matryoshka_infonce(q, c, hn, labels, rq_list, rc_list, scale, qm, cm, hm)
    terms_ref, lse_ref = reference.infonce_terms(x["q"], x["c"], x["own_c"], x["labels"], groups, scale,
                                                 x["q_mask"], x["c_mask"], x["own_mask"])
    assert lse_ref.isnan().any() and (lse_ref == float("inf")).any() and (terms_ref == float("inf")).any()
    assert torch.isfinite(lse_ref).sum() >= lse_ref.numel() // 4
    _assert_same_non_finite(lse, lse_ref, "lse", rtol=1e-6)
    _assert_same_non_finite(terms, terms_ref, "terms", rtol=1e-6)
    grad = torch.randn(terms.shape, generator=torch.Generator().manual_seed(17))
    got = triton_ops().triton_matryoshka_infonce_backward(
        grad.to(device), lse, q, c, hn, labels, rq_list, rc_list, scale, qm, cm, hm, [True, True, True])
    expected = reference.infonce_backward(grad, lse_ref, x["q"], x["c"], x["own_c"], x["labels"], groups, scale,
                                          x["q_mask"], x["c_mask"], x["own_mask"])
    rtol = 1e-5 if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype]
    _check_loss_gradients(got, expected, grad, scale, x["q"], torch.cat([x["c"], x["own_c"].flatten(0, 1)]), rtol)


def _check_loss_gradients(got, expected, grad, scale, q, candidates, rtol):
    """dq, dc, dhn of the loss: |dS_g(a, .)| sums to at most 2 |grad[g, a]| scale over a
    query's logits (softmax + one-hot)."""
    per_query = 2 * scale * grad.abs().sum(0)
    bounds = (_gradient_atol(per_query, candidates, 3), _gradient_atol(per_query.sum().expand(1), q, 3),
              _gradient_atol(per_query, q, 4))
    for name, g, e, atol in zip(("dq", "dc", "dhn"), got, expected, bounds):
        _assert_same_non_finite(g, e, f"loss {name}", rtol, atol)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_whose_logits_are_all_minus_inf(device):
    """Every logit of query 0 is -inf (in-batch and hard negatives): lse = -inf as in
    torch.logsumexp (not NaN from exp(-inf - -inf)), terms NaN (-inf - -inf), its gradients
    NaN; query 1 sees only finite logits and stays finite."""
    q = torch.tensor([[[1.0, BIG]], [[1.0, 0.0]]])  # (2, 1, 2)
    c = torch.tensor([[[0.5, -BIG]], [[-0.25, -BIG]], [[1.0, -BIG]]])  # S = -inf for query 0
    hn = torch.tensor([[[[0.75, -BIG]]], [[[0.25, -BIG]]]])
    labels = torch.tensor([1, 2])
    terms, lse, _ = triton_ops().triton_matryoshka_infonce(*_on(device, q, c, hn, labels), [1], [1], 2.0,
                                                               None, None, None)
    terms_ref, lse_ref = reference.infonce_terms(q, c, hn, labels, ((1, 1),), 2.0, None, None, None)
    assert lse_ref[0, 0] == float("-inf") and terms_ref[0, 0].isnan() and torch.isfinite(terms_ref[0, 1])
    _assert_same_non_finite(lse, lse_ref, "lse", rtol=1e-6)
    _assert_same_non_finite(terms, terms_ref, "terms", rtol=1e-6)
    grad = torch.ones(1, 2)
    got = triton_ops().triton_matryoshka_infonce_backward(*_on(device, grad, lse, q, c, hn, labels), [1], [1],
                                                                 2.0, None, None, None, [True, True, True])
    expected = reference.infonce_backward(grad, lse_ref, q, c, hn, labels, ((1, 1),), 2.0, None, None, None)
    _check_loss_gradients(got, expected, grad, 2.0, q, torch.cat([c, hn.flatten(0, 1)]), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_non_finite_tokens_change_nothing(device):
    """NaN / inf in masked tokens (queries, in-batch candidates, paired candidates, hard
    negatives): scores, loss and gradients equal those with the masked tokens zeroed --
    bitwise -- and the masked tokens' gradients are exactly 0 (a tensor-core product would
    give 0 * NaN = NaN if they were read)."""
    x = _small_problem_inputs(torch.bfloat16, seed=18)
    rq, rc = [1, 5, 2], [1, 7, 3]
    dirty = {}
    for name, mask in (("q", "q_mask"), ("c", "c_mask"), ("cp", "cp_mask"), ("hn", "hn_mask")):
        t = x[name].clone()
        t[~x[mask]] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(4)[:t.shape[-1]].to(t.dtype)
        x[name] = x[name].masked_fill(~x[mask].unsqueeze(-1), 0)
        dirty[name] = t
    ops = triton_ops()

    def run(t):
        q, c, cp, hn, qm, cm, cpm, hm, labels = _on(device, t["q"], t["c"], t["cp"], t["hn"], x["q_mask"],
                                                    x["c_mask"], x["cp_mask"], x["hn_mask"], x["labels"])
        gs = torch.Generator().manual_seed(20)
        out = [ops.triton_maxsim_grouped(q, c, rq, rc, qm, cm)[0], ops.triton_maxsim_paired_grouped(q, cp, rq, rc, qm, cpm)[0]]
        out += ops.triton_maxsim_grouped_backward(torch.randn(3, 3, 4, generator=gs).to(device), q, c, rq, rc, qm, cm,
                                                  [True, True])
        out += ops.triton_maxsim_paired_grouped_backward(torch.randn(3, 3, 2, generator=gs).to(device), q, cp, rq, rc,
                                                         qm, cpm, [True, True])
        terms, lse, _ = ops.triton_matryoshka_infonce(q, c, hn, labels, rq, rc, 2.0, qm, cm, hm)
        out += [terms, lse]
        out += ops.triton_matryoshka_infonce_backward(torch.randn(3, 3, generator=gs).to(device), lse, q, c, hn,
                                                      labels, rq, rc, 2.0, qm, cm, hm, [True, True, True])
        return [t.cpu() for t in out]

    clean, with_garbage = run(x), run(dirty)
    for k, (a, b) in enumerate(zip(clean, with_garbage)):
        assert torch.isfinite(a).all() and torch.equal(a, b), k
    dq, dc = with_garbage[2], with_garbage[3]
    assert torch.all(dq[~x["q_mask"]] == 0) and torch.all(dc[~x["c_mask"]] == 0)
    assert torch.all(with_garbage[5][~x["cp_mask"]] == 0) and torch.all(with_garbage[-1][~x["hn_mask"]] == 0)


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


KD_GROUPS = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64), (32, 180))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_paired_matches_reference_at_the_kd_shape(dtype):
    """The distillation shape of the integrations issue: B = 32 queries x 32 tokens, each
    against its own N = 32 documents x 180 tokens, D = 128 (r_c = 180: column chunks), masks."""
    b, n, rq, rc, d = 32, 32, 32, 180, 128
    gen = torch.Generator().manual_seed(21)
    q, c = exact_values((b, rq, d), gen, dtype), exact_values((b, n, rc, d), gen, dtype)
    q_mask, c_mask = _paired_masks(b, rq, n, rc, gen)
    q_k, c_k = q.cuda().requires_grad_(), c.cuda().requires_grad_()
    out = maxsim_paired_grouped(q_k, c_k, KD_GROUPS, q_mask=q_mask.cuda(), c_mask=c_mask.cuda(), backend="triton")
    q_r, c_r = q.double().requires_grad_(), c.double().requires_grad_()
    expected = reference.maxsim_grouped_paired(q_r, c_r, KD_GROUPS, q_mask, c_mask)
    assert torch.equal(out.cpu().double(), expected.detach())  # exact inputs: exact fp32 sums
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad.cuda())
    expected.backward(grad.double())
    g = grad.abs().max().item()
    assert_close(q_k.grad, q_r.grad, grad_tolerance(q_r.grad, dtype, n * 6, g * c.abs().max()), "gpu paired dq")
    assert_close(c_k.grad, c_r.grad, grad_tolerance(c_r.grad, dtype, rq * 6, g * q.abs().max()), "gpu paired dc")


@requires_gpu
@pytest.mark.gpu
def test_gpu_paired_backward_is_deterministic():
    gen = torch.Generator().manual_seed(22)
    q = normal_values((16, 16, 256), gen, torch.bfloat16).cuda().requires_grad_()
    c = normal_values((16, 40, 64, 256), gen, torch.bfloat16).cuda().requires_grad_()
    grads = []
    for _ in range(3):
        q.grad = c.grad = None
        maxsim_paired_grouped(q, c, DEFAULT_GROUPS, backend="triton").sum().backward()
        grads.append((q.grad.clone(), c.grad.clone()))
    assert all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))


@requires_gpu
@pytest.mark.gpu
def test_gpu_paired_offsets_past_two_to_the_31_elements():
    """c (B, N, Rc, D) has more than 2^31 elements (4.3 GB bf16): query 1's last candidates
    need 64-bit offsets, in the forward and in both backward passes."""
    rc, d = 64, 128
    n = (2**31) // (2 * rc * d) + 3
    if torch.cuda.get_device_properties(0).total_memory < 5.5 * 2 * n * rc * d * 2:
        pytest.skip("needs ~24 GB of GPU memory")
    gen = torch.Generator().manual_seed(23)
    q = normal_values((2, 16, d), gen, torch.bfloat16)
    tail = normal_values((5, rc, d), gen, torch.bfloat16)
    c = torch.zeros(2, n, rc, d, dtype=torch.bfloat16, device="cuda")
    c[1, -5:] = tail.cuda()
    c.requires_grad_()
    q_k = q.cuda().requires_grad_()
    out = maxsim_paired_grouped(q_k, c, DEFAULT_GROUPS, backend="triton")
    q_r, tail_r = q[1:].double().requires_grad_(), tail.double().unsqueeze(0).requires_grad_()
    expected = reference.maxsim_grouped_paired(q_r, tail_r, DEFAULT_GROUPS)
    assert_close(out[:, 1:, -5:], expected, score_tolerance(q[1:], tail, DEFAULT_GROUPS), "scores past 2^31")
    grad = torch.zeros_like(out)
    grad[:, 1, -5:] = 1.0
    out.backward(grad)
    expected.backward(torch.ones_like(expected))
    assert_close(c.grad[1, -5:], tail_r.grad[0], 2 * UNIT_ROUNDOFF[torch.bfloat16] * tail_r.grad[0].abs() + 1e-3,
                 "dc past 2^31")
    assert_close(q_k.grad[1], q_r.grad[0], 2 * UNIT_ROUNDOFF[torch.bfloat16] * q_r.grad[0].abs() + 1e-3,
                 "dq past 2^31")
    assert int(torch.count_nonzero(c.grad[0])) == 0 and int(torch.count_nonzero(c.grad[1, :-5])) == 0
