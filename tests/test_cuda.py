"""CUDA C++ backend (csrc/cuda) against the float64 reference.

The same kernels run under two runners:
  * "cuda":     the compiled extension on a GPU; skipped when torch.cuda.is_available() is
                False or the extension was built without CUDA.
  * "cuda-emu": csrc/cuda/kernels.cu and ops_cuda.cpp compiled as plain C++ and executed by
                the CPU emulator in csrc/cuda/emulate.h (one fiber per CUDA thread). Enabled
                with METAEMBED_CUDA_EMU=1 (the CUDA gate, scripts/cuda_gate.sh, sets it); it
                builds on first use (about 2 minutes). Besides the numbers it checks barrier
                divergence, out-of-bounds or misaligned global accesses, WMMA alignment and,
                by replaying with different thread orders, races between barriers.

What it covers: the three op families (maxsim_grouped, maxsim_paired_grouped,
matryoshka_infonce) forward and backward over the awkward-shape sweep, output_mask (no
launch for a gradient nobody wants), the non-finite contract (NaN / +-inf in valid tokens
follow torch; masked tokens are never read), label checks, chunked workspaces, and, on a
GPU only, no host sync and CUDA-graph capture of a training step for every GPU backend.
Nothing here can measure speed; benchmarks/ does that on a GPU.
"""
import itertools
import os
import random
from pathlib import Path

import pytest
import torch

from helpers import (
    DTYPES,
    UNIT_ROUNDOFF,
    assert_close,
    dtype_id,
    exact_values,
    grad_tolerance,
    normal_values,
    random_groups,
    random_masks,
    score_tolerance,
    sweep_cases,
)
from metaembed_kernels import (
    DEFAULT_GROUPS,
    _autograd,
    _extension,
    backends,
    matryoshka_infonce,
    maxsim_grouped,
    maxsim_paired_grouped,
    reference,
)
from metaembed_kernels._schemas import OP_NAMES

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------
# The emulated backend
# ---------------------------------------------------------------------------------------
def _emu_build_dir() -> str:
    explicit = os.environ.get("METAEMBED_CUDA_EMU_BUILD")
    if explicit:
        return explicit
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metaembed-kernels"
    return str(cache / f"cuda-emu-build-torch{torch.__version__.replace('+', '-')}")


def _load_emulator():
    if os.environ.get("METAEMBED_CUDA_EMU", "0") in ("", "0"):
        return "set METAEMBED_CUDA_EMU=1 to run the CUDA kernels in the CPU emulator"
    from torch.utils import cpp_extension

    build = _emu_build_dir()
    os.makedirs(build, exist_ok=True)
    cpp_extension.load(
        name="metaembed_cuda_emu",
        sources=[str(ROOT / "csrc/cuda/emulation/ops_emu.cpp"), str(ROOT / "csrc/cuda/emulation/kernels_emu.cpp")],
        extra_cflags=["-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"],
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    _autograd.register_all(namespace="metaembed_emu")
    return None


class EmulatedCudaBackend(backends.Backend):
    """The CUDA kernels on CPU tensors through the emulator (ops metaembed_emu::*)."""

    name = "cuda-emu"
    op_namespace = "metaembed_emu"

    def unavailable_reason(self, device_type, dtype, max_rq=1, max_rc=1):  # any budget: no tile limits
        if device_type != "cpu":
            return "the emulator runs CPU tensors"
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"backend 'cuda-emu' does not support {dtype}"
        return None


EMU_SKIP = _load_emulator()
if EMU_SKIP is None:
    backends._BACKENDS["cuda-emu"] = EmulatedCudaBackend()


def _cuda_skip():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not _extension.has_kernel("cuda"):
        return "the extension was built without CUDA kernels"
    return None


CUDA_SKIP = _cuda_skip()
RUNNERS = {"cuda": ("cuda", CUDA_SKIP), "cuda-emu": ("cpu", EMU_SKIP)}
requires_emulator = pytest.mark.skipif(EMU_SKIP is not None, reason=str(EMU_SKIP))


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.gpu) if name == "cuda" else name for name in RUNNERS])
def runner(request):
    """(backend name, device) of each runner that can run here."""
    device, skip = RUNNERS[request.param]
    if skip:
        pytest.skip(skip)
    if device == "cuda":  # the device tensors land on: cuda:N (the bare "cuda" compares unequal)
        return request.param, torch.device(device, torch.cuda.current_device())
    return request.param, torch.device(device)


def ops_of(name):
    return torch.ops.metaembed_emu if name == "cuda-emu" else torch.ops.metaembed


def launches():
    return torch.ops.metaembed_emu.launch_count()


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def split(groups):
    return [g[0] for g in groups], [g[1] for g in groups]


SWEEP = [pytest.param(case, dtype, id=f"{case}-{dtype_id(dtype)}") for case in sweep_cases() for dtype in DTYPES]


def make_inputs(case, dtype, values):
    gen = torch.Generator().manual_seed(case.seed)
    q = values((case.nq, case.rq, case.d), gen, dtype)
    c = values((case.nc, case.rc, case.d), gen, dtype)
    q_mask, c_mask = random_masks(case.nq, case.rq, case.nc, case.rc, gen) if case.masked else (None, None)
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    return q, c, q_mask, c_mask, groups


def paired_masks(b, rq, n, rc, gen):
    """Per-query masks like random_masks: ~35% invalid tokens (not prefixes), a fully masked
    query, a fully masked candidate, and a candidate whose only valid token is its last."""
    q_mask = torch.rand(b, rq, generator=gen) > 0.35
    c_mask = torch.rand(b, n, rc, generator=gen) > 0.35
    q_mask[b // 2] = False
    c_mask[b // 2, n // 2] = False
    c_mask[0, 0] = False
    c_mask[0, 0, -1] = True
    return q_mask, c_mask


def make_paired_inputs(case, dtype, values):
    """The sweep's shapes as per-query candidates: B = Nq queries, N = Nc candidates each."""
    gen = torch.Generator().manual_seed(100 + case.seed)
    q = values((case.nq, case.rq, case.d), gen, dtype)
    c = values((case.nq, case.nc, case.rc, case.d), gen, dtype)
    q_mask, c_mask = paired_masks(case.nq, case.rq, case.nc, case.rc, gen) if case.masked else (None, None)
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    return q, c, q_mask, c_mask, groups


def scores_fn(paired):
    return maxsim_paired_grouped if paired else maxsim_grouped


def reference_scores(paired):
    return reference.maxsim_grouped_paired if paired else reference.maxsim_grouped


def paired_tolerance(q, c, groups):
    """score_tolerance per query against its own candidates: (G, B, N)."""
    return torch.stack([score_tolerance(q[a : a + 1], c[a], groups)[:, 0] for a in range(q.shape[0])], dim=1)


# ---------------------------------------------------------------------------------------
# Parity sweep: forward, gradients, fused loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,dtype", SWEEP)
def test_forward_matches_reference(runner, case, dtype):
    name, dev = runner
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, normal_values)
    out = maxsim_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name)
    assert out.dtype == torch.float32 and out.shape == (len(groups), case.nq, case.nc) and out.device == dev
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out.cpu(), expected, score_tolerance(q, c, groups), f"{name} scores {groups}")


@pytest.mark.parametrize("case,dtype", SWEEP)
def test_paired_forward_matches_reference(runner, case, dtype):
    name, dev = runner
    q, c, q_mask, c_mask, groups = make_paired_inputs(case, dtype, normal_values)
    out = maxsim_paired_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0],
                                backend=name)
    assert out.dtype == torch.float32 and out.shape == (len(groups), case.nq, case.nc) and out.device == dev
    assert out.is_contiguous()
    expected = reference.maxsim_grouped_paired(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out.cpu(), expected, paired_tolerance(q, c, groups), f"{name} paired scores {groups}")


def check_backward(name, dev, q, c, q_mask, c_mask, groups, seed, paired=False):
    """Exact-arithmetic inputs: argmax decisions (ties included) agree with the reference,
    so gradients must match up to fp32 accumulation and the final rounding."""
    gen = torch.Generator().manual_seed(seed)
    cols = c.shape[1] if paired else c.shape[0]
    grad = torch.randn(len(groups), q.shape[0], cols, generator=gen)
    qk, ck = [t.detach().to(dev).requires_grad_() for t in (q, c)]
    scores_fn(paired)(qk, ck, groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name).backward(
        grad.to(dev)
    )
    qr, cr = q.double().requires_grad_(), c.double().requires_grad_()
    reference_scores(paired)(qr, cr, groups, q_mask, c_mask).backward(grad.double())
    assert qk.grad.dtype == q.dtype and ck.grad.dtype == c.dtype
    assert qk.grad.shape == q.shape and ck.grad.shape == c.shape
    g_abs = torch.tensor(grad.abs().max().item())
    # terms summed into one gradient element: dq over the candidates (of its query when
    # paired) and groups; dc over the query tokens (of its one query when paired) and groups
    n_q = cols * len(groups)
    n_c = (1 if paired else q.shape[0]) * q.shape[1] * len(groups)
    assert_close(qk.grad.cpu(), qr.grad, grad_tolerance(qr.grad, q.dtype, n_q, g_abs), f"{name} dq")
    assert_close(ck.grad.cpu(), cr.grad, grad_tolerance(cr.grad, q.dtype, n_c, g_abs), f"{name} dc")
    if q_mask is not None:  # masked tokens get exactly zero
        assert (qk.grad.cpu()[~q_mask] == 0).all() and (ck.grad.cpu()[~c_mask] == 0).all()


@pytest.mark.parametrize("case,dtype", SWEEP)
def test_backward_matches_reference(runner, case, dtype):
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    check_backward(*runner, q, c, q_mask, c_mask, groups, case.seed + 1)


@pytest.mark.parametrize("case,dtype", SWEEP)
def test_paired_backward_matches_reference(runner, case, dtype):
    q, c, q_mask, c_mask, groups = make_paired_inputs(case, dtype, exact_values)
    check_backward(*runner, q, c, q_mask, c_mask, groups, case.seed + 1, paired=True)


SMALL_GROUPS = ((1, 1), (2, 3), (4, 5), (3, 7))


def make_loss_inputs(nq=5, nc=11, rq=5, rc=9, d=20, k=1, dtype=torch.float32, seed=0, masks=False):
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        q=exact_values((nq, rq, d), gen, dtype),
        c=exact_values((nc, rc, d), gen, dtype),
        hn=exact_values((nq, k, rc, d), gen, dtype),
        labels=torch.randperm(nc, generator=gen)[:nq],
    )
    if masks:
        x["q_mask"] = torch.rand(nq, rq, generator=gen) > 0.3
        x["c_mask"] = torch.rand(nc, rc, generator=gen) > 0.3
        x["hn_mask"] = torch.rand(nq, k, rc, generator=gen) > 0.3
        x["c_mask"][1] = False
        if k:
            x["hn_mask"][0, 0] = False
    return x


def check_loss(name, dev, x, groups, k, temperature=0.5, weights=None):
    kw = dict(weights=weights or (1.0,) * len(groups), temperature=temperature, labels=x["labels"],
              return_group_losses=True)
    masks = dict(q_mask=x.get("q_mask"), c_mask=x.get("c_mask"), hard_negatives_mask=x.get("hn_mask") if k else None)
    tensors = [x["q"], x["c"]] + ([x["hn"]] if k else [])
    got = [t.detach().to(dev).requires_grad_() for t in tensors]
    loss, group_losses = matryoshka_infonce(
        got[0], got[1], groups, hard_negatives=got[2] if k else None, backend=name,
        **{**kw, "labels": kw["labels"].to(dev)}, **{n: on(dev, m)[0] for n, m in masks.items()},
    )
    loss.backward()
    ref = [t.double().requires_grad_() for t in tensors]
    loss_r, groups_r = reference.matryoshka_infonce(ref[0], ref[1], groups, hard_negatives=ref[2] if k else None,
                                                    **kw, **masks)
    loss_r.backward()
    assert_close(group_losses.cpu(), groups_r, 1e-5 * (1 + groups_r.abs()), f"{name} group losses")
    assert_close(loss.cpu(), loss_r, 1e-5 * (1 + loss_r.abs()), f"{name} loss")
    u = UNIT_ROUNDOFF[x["q"].dtype]
    # fp32: the bound of test_loss.py for sums of up to 64 terms, growing linearly past that
    # (a dc element sums over Nq*Rq query tokens), plus the softmax's relative error from an
    # fp32 log-sum-exp of magnitude |lse| (~u*|lse|). The CPU backend errs by the same amounts.
    nq, rq = x["q"].shape[:2]
    n_terms = {"dq": (x["c"].shape[0] + k) * len(groups), "dc": nq * rq, "dhn": rq}
    logits = reference.infonce_logits(x["q"].double(), x["c"].double(), groups, temperature,
                                      x["hn"].double() if k else None, masks["hard_negatives_mask"],
                                      masks["q_mask"], masks["c_mask"])
    lse_u = 8 * UNIT_ROUNDOFF[torch.float32] * logits.abs().max().item()
    for label, g, r in zip(("dq", "dc", "dhn"), got, ref):
        assert g.grad.dtype == x["q"].dtype
        fp32 = 1e-5 * max(1.0, n_terms[label] / 64) + lse_u
        tol = 4 * u * r.grad.abs() + (2 * u if x["q"].dtype != torch.float32 else fp32) * r.grad.abs().max() + 1e-7
        assert_close(g.grad.cpu(), r.grad, tol, f"{name} {label}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "mask"])
def test_fused_loss_matches_reference(runner, dtype, k, masks):
    x = make_loss_inputs(k=k, dtype=dtype, seed=10 + k, masks=masks)
    check_loss(*runner, x, SMALL_GROUPS, k, weights=(1.0, 0.5, 2.0, 1.5))


# ---------------------------------------------------------------------------------------
# Paths the small sweep does not reach
# ---------------------------------------------------------------------------------------
EDGE_SHAPES = {
    # Rq > 128: one query spans two row tiles (partial scores carried across tiles)
    "rq130": dict(nq=2, nc=3, rq=130, rc=7, d=16),
    # Rc > 64: item tokens in 64-token chunks, running max/argmax carried across chunks
    "rc150": dict(nq=3, nc=2, rq=5, rc=150, d=24),
    # several query blocks and item tiles, D not a multiple of 8 (scalar loads), D > 32
    "blocks": dict(nq=40, nc=20, rq=4, rc=3, d=45),
    # D > one 128-wide gradient slice and many D stages
    "d300": dict(nq=3, nc=4, rq=16, rc=64, d=300),
}
# Per-query items: the same paths with each query's own candidates (N = nc per query).
PAIRED_EDGE_SHAPES = {
    "rq130": dict(nq=2, nc=3, rq=130, rc=7, d=16),
    "rc150": dict(nq=3, nc=2, rq=5, rc=150, d=24),
    # many items per tile (cb = 64 / rc) and several tiles per query
    "items": dict(nq=5, nc=45, rq=4, rc=3, d=45),
    "d300": dict(nq=2, nc=3, rq=16, rc=64, d=300),
}


def edge_groups(s):
    return ((1, 1), (s["rq"], s["rc"]), (max(1, s["rq"] // 2), max(1, s["rc"] - 70)),
            (s["rq"] - 1 or 1, 65 % s["rc"] + 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", list(EDGE_SHAPES), ids=str)
def test_blocking_edge_cases(runner, shape, dtype):
    s = EDGE_SHAPES[shape]
    gen = torch.Generator().manual_seed(7)
    q = exact_values((s["nq"], s["rq"], s["d"]), gen, dtype)
    c = exact_values((s["nc"], s["rc"], s["d"]), gen, dtype)
    q_mask, c_mask = random_masks(s["nq"], s["rq"], s["nc"], s["rc"], gen)
    groups = edge_groups(s)
    name, dev = runner
    out = maxsim_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name)
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out.cpu(), expected, score_tolerance(q, c, groups), f"{shape} scores")
    check_backward(name, dev, q, c, q_mask, c_mask, groups, seed=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", list(PAIRED_EDGE_SHAPES), ids=str)
def test_paired_blocking_edge_cases(runner, shape, dtype):
    s = PAIRED_EDGE_SHAPES[shape]
    gen = torch.Generator().manual_seed(17)
    q = exact_values((s["nq"], s["rq"], s["d"]), gen, dtype)
    c = exact_values((s["nq"], s["nc"], s["rc"], s["d"]), gen, dtype)
    q_mask, c_mask = paired_masks(s["nq"], s["rq"], s["nc"], s["rc"], gen)
    groups = edge_groups(s)
    name, dev = runner
    out = maxsim_paired_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0],
                                backend=name)
    expected = reference.maxsim_grouped_paired(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out.cpu(), expected, paired_tolerance(q, c, groups), f"{shape} paired scores")
    check_backward(name, dev, q, c, q_mask, c_mask, groups, seed=18, paired=True)


@pytest.mark.parametrize("seed", [*range(12), 114, 282])
def test_random_shapes(runner, seed):
    """Random sizes (sometimes past one row tile or one 64-token chunk), groups, masks and
    dtypes: scores, gradients, per-query scores and the fused loss with hard negatives."""
    rng = random.Random(1000 + seed)
    nq, nc, k = rng.randint(1, 9), rng.randint(1, 9), rng.randint(0, 2)
    rq = rng.choice([1, 2, 3, 8, 16, 33, 129])
    rc = rng.choice([1, 2, 5, 16, 63, 64, 65, 100])
    d = rng.choice([1, 3, 8, 16, 40, 64, 72, 130])
    dtype = DTYPES[seed % 3]
    gen = torch.Generator().manual_seed(seed)
    groups = random_groups(rq, rc, rng, max_groups=6)
    q, c = exact_values((nq, rq, d), gen, dtype), exact_values((nc, rc, d), gen, dtype)
    q_mask, c_mask = random_masks(nq, rq, nc, rc, gen) if seed % 2 else (None, None)
    name, dev = runner
    out = maxsim_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name)
    assert_close(out.cpu(), reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask),
                 score_tolerance(q, c, groups), f"scores {groups}")
    check_backward(name, dev, q, c, q_mask, c_mask, groups, seed=seed)
    n = rng.randint(1, 4)
    cp = exact_values((nq, n, rc, d), gen, dtype)
    cp_mask = paired_masks(nq, rq, n, rc, gen)[1] if seed % 2 else None
    check_backward(name, dev, q, cp, q_mask, cp_mask, groups, seed=seed, paired=True)
    x = dict(q=q, c=c, hn=exact_values((nq, k, rc, d), gen, dtype), labels=torch.randint(0, nc, (nq,), generator=gen))
    if q_mask is not None:
        x.update(q_mask=q_mask, c_mask=c_mask, hn_mask=torch.rand(nq, k, rc, generator=gen) > 0.3)
    check_loss(name, dev, x, groups, k, temperature=2.0)


def test_long_rq_and_rc_in_the_fused_loss(runner):
    x = make_loss_inputs(nq=2, nc=3, rq=131, rc=70, d=8, k=2, seed=3, masks=True)
    check_loss(*runner, x, ((1, 1), (131, 70), (64, 66), (129, 3)), k=2)


def test_more_groups_than_one_launch_takes(runner):
    """40 groups: the host splits them into launches of at most 32 (kMaxGroups)."""
    name, dev = runner
    gen = torch.Generator().manual_seed(9)
    q, c = exact_values((3, 8, 16), gen), exact_values((4, 10, 16), gen)
    groups = tuple((1 + g % 8, 1 + (g * 7) % 10) for g in range(40))
    out = maxsim_grouped(*on(dev, q, c), groups, backend=name)
    assert_close(out.cpu(), reference.maxsim_grouped(q.double(), c.double(), groups),
                 score_tolerance(q, c, groups), "40 groups")
    check_backward(name, dev, q, c, None, None, groups, seed=10)
    cp = exact_values((3, 2, 10, 16), gen)
    out = maxsim_paired_grouped(*on(dev, q, cp), groups, backend=name)
    assert_close(out.cpu(), reference.maxsim_grouped_paired(q.double(), cp.double(), groups),
                 paired_tolerance(q, cp, groups), "40 groups, paired")
    check_backward(name, dev, q, cp, None, None, groups, seed=10, paired=True)
    x = make_loss_inputs(nq=3, nc=4, rq=8, rc=10, d=16, k=1, seed=11)
    check_loss(name, dev, x, groups, k=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_inputs(runner, dtype):
    name, dev = runner
    gen = torch.Generator().manual_seed(3)
    q_base = exact_values((5, 20, 48), gen, dtype).to(dev)
    c_base = exact_values((9, 8, 48), gen, dtype).to(dev)
    hn_base = exact_values((5, 8, 3, 48), gen, dtype).to(dev)
    cases = {
        "token-slice": (q_base[:, 2:18], c_base.transpose(0, 1)[:, :7]),
        "strided-d": (q_base[:, :16, ::2], c_base.transpose(0, 1)[:, :, 1::2]),
        "every-other-item": (q_base[::2, :16], c_base.transpose(0, 1)[::2]),
    }
    for label, (q, c) in cases.items():
        assert not q.is_contiguous() and not c.is_contiguous()
        qm = (torch.rand(q.shape[0], 2 * q.shape[1], generator=gen) > 0.3)[:, ::2]
        cm = (torch.rand(c.shape[0], c.shape[1], generator=gen) > 0.3).t().contiguous().t()
        groups = ((1, 1), (q.shape[1], c.shape[1]), (3, 5))
        out = maxsim_grouped(q, c, groups, q_mask=qm.to(dev), c_mask=cm.to(dev), backend=name)
        qd, cd = q.cpu().double(), c.cpu().double()
        assert_close(out.cpu(), reference.maxsim_grouped(qd, cd, groups, qm, cm), score_tolerance(q.cpu(), c.cpu(), groups),
                     label)
        check_backward(name, dev, q.cpu(), c.cpu(), qm, cm, groups, seed=4)
    # hard negatives whose token stride is not D (K and Rc transposed)
    hn = hn_base.transpose(1, 2)  # (5, 3, 8, 48)
    q = q_base[:, :6]
    c = c_base[:6]
    got = matryoshka_infonce(q, c, ((1, 1), (6, 8)), hard_negatives=hn, backend=name)
    ref = reference.matryoshka_infonce(q.cpu().double(), c.cpu().double(), ((1, 1), (6, 8)),
                                       hard_negatives=hn.cpu().double())
    assert abs(got.item() - ref.item()) < 1e-5 * (1 + abs(ref.item()))
    # per-query candidates: N and Rc transposed, every other D element, an expanded query mask
    for label, cp in {"transposed": hn, "strided-d": hn_base[..., ::2].transpose(1, 2)}.items():
        qp = q_base[:, :6, : cp.shape[-1]] if label == "transposed" else q_base[:, :6, 1::2]
        qm = (torch.rand(1, 6, generator=gen) > 0.3).expand(5, 6)
        cm = (torch.rand(5, 8, 3, generator=gen) > 0.3).transpose(1, 2)
        groups = ((1, 1), (6, 8), (2, 5))
        out = maxsim_paired_grouped(qp, cp, groups, q_mask=qm.to(dev), c_mask=cm.to(dev), backend=name)
        exp = reference.maxsim_grouped_paired(qp.cpu().double(), cp.cpu().double(), groups, qm, cm)
        assert_close(out.cpu(), exp, paired_tolerance(qp.cpu(), cp.cpu(), groups), f"paired {label}")
        check_backward(name, dev, qp.cpu(), cp.cpu(), qm, cm, groups, seed=5, paired=True)


def test_ties_masks_and_empty_prefixes(runner):
    name, dev = runner
    q = torch.ones(2, 3, 8)
    c = torch.zeros(4, 6, 8)
    c[:, 1] = c[:, 3] = c[:, 4] = 1.0  # tokens 1, 3 and 4 tie; 1 must get all the gradient
    cg = c.to(dev).detach().requires_grad_()
    maxsim_grouped(q.to(dev), cg, ((3, 6), (1, 2)), backend=name).sum().backward()
    expected = torch.zeros_like(c)
    expected[:, 1] = 2 * (3 + 1)
    assert torch.equal(cg.grad.cpu(), expected)
    # the same per query: each query's own candidates
    cg = c.view(2, 2, 6, 8).to(dev).detach().requires_grad_()
    maxsim_paired_grouped(q.to(dev), cg, ((3, 6), (1, 2)), backend=name).sum().backward()
    assert torch.equal(cg.grad.cpu(), (expected / 2).view(2, 2, 6, 8))

    q = torch.ones(1, 2, 4)
    c = -torch.ones(1, 4, 4)
    c_mask = torch.tensor([[False, False, True, True]])
    groups = ((2, 1), (2, 2), (2, 3), (1, 4))
    out = maxsim_grouped(q.to(dev), c.to(dev), groups, c_mask=c_mask.to(dev), backend=name)
    assert out.flatten().tolist() == [0.0, 0.0, -8.0, -4.0]
    out = maxsim_paired_grouped(q.to(dev), c[None].to(dev), groups, c_mask=c_mask[None].to(dev), backend=name)
    assert out.flatten().tolist() == [0.0, 0.0, -8.0, -4.0]


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_batches(runner, shape):
    name, dev = runner
    nq, nc = shape
    q = torch.randn(nq, 4, 8, device=dev, requires_grad=True)
    c = torch.randn(nc, 6, 8, device=dev, requires_grad=True)
    out = maxsim_grouped(q, c, ((1, 1), (4, 6)), backend=name)
    assert out.shape == (2, nq, nc)
    out.sum().backward()
    assert q.grad.shape == q.shape and c.grad.shape == c.shape
    cp = torch.randn(nq, nc, 6, 8, device=dev, requires_grad=True)
    q.grad = None
    out = maxsim_paired_grouped(q, cp, ((1, 1), (4, 6)), backend=name)
    assert out.shape == (2, nq, nc)
    out.sum().backward()
    assert q.grad.shape == q.shape and cp.grad.shape == cp.shape and not q.grad.any()


def test_large_logits_stay_finite(runner):
    name, dev = runner
    x = make_loss_inputs(nq=6, nc=9, rq=4, rc=7, d=24, k=1, seed=12)
    q, c = (x["q"] * 4).to(dev).requires_grad_(), (x["c"] * 4).to(dev).requires_grad_()
    loss = matryoshka_infonce(q, c, SMALL_GROUPS, temperature=0.01, labels=x["labels"].to(dev), backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


@requires_emulator
@pytest.mark.parametrize("paired", [False, True], ids=["in-batch", "paired"])
def test_chunked_workspaces_match_one_chunk(paired):
    """With the workspace shrunk, the backward runs in many candidate chunks (in-batch) or
    query chunks (per-query items); exact inputs make every sum exact, so the results equal
    the one-chunk run bitwise (and the reference)."""
    gen = torch.Generator().manual_seed(21)
    q = exact_values((7, 5, 20), gen)
    c = exact_values((7, 3, 9, 20) if paired else (6, 9, 20), gen)
    hn = exact_values((7, 2, 9, 20), gen)
    q_mask = torch.rand(7, 5, generator=gen) > 0.3
    c_mask = torch.rand(c.shape[:-1], generator=gen) > 0.3
    labels = torch.randint(0, 6, (7,), generator=gen)
    ops = torch.ops.metaembed_emu
    grq, grc = split(SMALL_GROUPS)
    grad = exact_values((4, 7, c.shape[1] if paired else 6), gen)

    def run():
        if paired:
            return ops.maxsim_paired_grouped_backward(grad, q, c, grq, grc, q_mask, c_mask, [True, True])
        terms, lse, _ = ops.matryoshka_infonce(q, c, hn, labels, grq, grc, 2.0, q_mask, c_mask, None)
        return (*ops.maxsim_grouped_backward(grad, q, c, grq, grc, q_mask, c_mask, [True, True]),
                *ops.matryoshka_infonce_backward(torch.ones_like(terms), lse, q, c, hn, labels, grq, grc, 2.0,
                                                 q_mask, c_mask, None, [True, True, True]))

    whole = run()
    count = launches()
    previous = ops.set_workspace_bytes(1)  # one candidate / one query per chunk
    try:
        chunked = run()
        # (score, weights, dq, dc) per chunk: 7 query chunks paired; else the loss forward
        # (2), 6 candidate chunks for maxsim and for the loss, 7 hard-negative query chunks
        assert launches() - count == (4 * 7 if paired else 2 + 4 * 6 + 4 * 6 + 4 * 7)
    finally:
        ops.set_workspace_bytes(previous)
    for k, (a, b) in enumerate(zip(whole, chunked)):
        if k == 2:  # the loss's dq: softmax weights are inexact, chunks sum in another order
            assert_close(b, a, 1e-6 * (1 + a.abs()), "chunked loss dq")
        else:  # exact weights (or one owner per element): bitwise
            assert torch.equal(a, b), k
    dq_r, dc_r = reference.scores_backward(grad.double(), q.double(), c.double(), SMALL_GROUPS, q_mask, c_mask, paired)
    assert_close(whole[0], dq_r, 1e-6, "dq")
    assert_close(whole[1], dc_r, 1e-6, "dc")


# ---------------------------------------------------------------------------------------
# output_mask: a gradient nobody asked for is not computed
# ---------------------------------------------------------------------------------------
def backward_case(op, name, dev, seed=31):
    """Inputs of one backward op call: (op name, args before output_mask, the inputs whose
    gradients it returns, launches per wanted pattern (emulator, one chunk))."""
    gen = torch.Generator().manual_seed(seed)
    grq, grc = split(SMALL_GROUPS)
    q = exact_values((4, 5, 24), gen, torch.bfloat16)
    qm = torch.rand(4, 5, generator=gen) > 0.3
    if op == "maxsim_grouped":
        c = exact_values((6, 9, 24), gen, torch.bfloat16)
        grad = torch.randn(4, 4, 6, generator=gen)
        args = (grad, q, c, grq, grc, qm, None)
        return args, (q, c), lambda want: (2 + sum(want)) if any(want) else 0
    if op == "maxsim_paired_grouped":
        c = exact_values((4, 3, 9, 24), gen, torch.bfloat16)
        grad = torch.randn(4, 4, 3, generator=gen)
        args = (grad, q, c, grq, grc, qm, torch.rand(4, 3, 9, generator=gen) > 0.2)
        return args, (q, c), lambda want: (2 + sum(want)) if any(want) else 0
    c = exact_values((6, 9, 24), gen, torch.bfloat16)
    hn = exact_values((4, 2, 9, 24), gen, torch.bfloat16)
    labels = torch.tensor([0, 2, 5, 1])
    terms, lse, _ = ops_of(name).matryoshka_infonce(*on(dev, q, c, hn, labels), grq, grc, 2.0, *on(dev, qm), None, None)
    grad = torch.randn(4, 4, generator=gen)
    args = (grad, lse.cpu(), q, c, hn, labels, grq, grc, 2.0, qm, None, None)

    def infonce_launches(want):
        dq, dc, dhn = want
        return ((2 + dq + dc) if dq or dc else 0) + ((2 + dq + dhn) if dq or dhn else 0)

    return args, (q, c, hn), infonce_launches


@pytest.mark.parametrize("op", ["maxsim_grouped", "maxsim_paired_grouped", "matryoshka_infonce"])
def test_output_mask_computes_only_the_wanted_gradients(runner, op):
    name, dev = runner
    args, inputs, expected_launches = backward_case(op, name, dev)
    args = [a.to(dev) if torch.is_tensor(a) else a for a in args]
    fn = getattr(ops_of(name), f"{op}_backward")
    full = fn(*args, [True] * len(inputs))
    assert all(torch.isfinite(g).all() and g.any() for g in full)
    for want in itertools.product([False, True], repeat=len(inputs)):
        before = launches() if name == "cuda-emu" else 0
        got = fn(*args, list(want))
        if name == "cuda-emu":
            assert launches() - before == expected_launches(want), want
        for wanted, g, f, x in zip(want, got, full, inputs):
            assert g.dtype == x.dtype and g.device == dev
            if wanted:  # the same launches for this gradient: bitwise the full call's
                assert g.shape == x.shape and g.is_contiguous() and torch.equal(g, f), want
            else:
                assert g.shape == (0,), want


def test_autograd_asks_only_for_the_gradients_it_needs(runner):
    """needs_input_grad reaches the kernels: a frozen candidate side launches no dc work."""
    name, dev = runner
    gen = torch.Generator().manual_seed(33)
    q = exact_values((4, 5, 24), gen).to(dev)
    c = exact_values((6, 9, 24), gen).to(dev)
    hn = exact_values((4, 2, 9, 24), gen).to(dev)
    labels = torch.tensor([0, 2, 5, 1], device=dev)
    full = {}
    for want_q, want_c in ((True, True), (True, False), (False, True)):
        qg, cg, hg = q.clone().requires_grad_(want_q), c.clone().requires_grad_(want_c), hn.clone().requires_grad_(want_c)
        before = launches() if name == "cuda-emu" else 0
        loss = matryoshka_infonce(qg, cg, SMALL_GROUPS, hard_negatives=hg, labels=labels, backend=name)
        loss.backward()
        if name == "cuda-emu":  # forward 2; backward (score, weights) x 2 + one gather per wanted input
            assert launches() - before == 2 + 4 + 2 * want_q + 2 * want_c
        grads = (qg.grad, cg.grad, hg.grad)
        assert [g is not None for g in grads] == [want_q, want_c, want_c]
        if want_q and want_c:
            full = grads
        else:
            for g, f in zip(grads, full):
                assert g is None or torch.equal(g, f)


# ---------------------------------------------------------------------------------------
# Non-finite values (SEMANTICS.md): NaN / +-inf in valid tokens follow torch, masked
# tokens are never read
# ---------------------------------------------------------------------------------------
def dense_scores_backward(dS, q, c, groups, q_mask, c_mask, paired):
    """The gradients as the reference forms them, in float64: dense products over the budget,
    dq = W . c and dc = W^T . q, W = the group weights at each argmax and 0 elsewhere, so a
    non-finite value also meets the zero weights (0 * NaN, 0 * inf = NaN): the contract of
    csrc/common/nonfinite.h. test_dense_oracle_is_autograd_of_the_reference checks that this
    closed form is autograd of the reference forward, non-finite values included."""
    return reference.scores_backward(dS.double(), q.double(), c.double(), groups, q_mask, c_mask, paired)


def dense_infonce_backward(grad, q, c, hn, labels, groups, scale, q_mask, c_mask, hn_mask):
    """(dq, dc, dhn, terms, lse) of matryoshka_infonce in float64, gradients as above."""
    qd, cd, hd = q.double(), c.double(), hn.double()
    terms, lse = reference.infonce_terms(qd, cd, hd, labels, groups, scale, q_mask, c_mask, hn_mask)
    dq, dc, dhn = reference.infonce_backward(grad.double(), lse, qd, cd, hd, labels, groups, scale, q_mask, c_mask,
                                             hn_mask)
    return dq, dc, dhn, terms, lse


def assert_same_nonfinite(actual, expected, atol, name):
    """NaN, +inf and -inf exactly where expected; finite values within atol."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    for what, fn in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF)):
        got, want = fn(actual), fn(expected)
        assert torch.equal(got, want), f"{name}: {what} at {got.nonzero().tolist()}, expected at {want.nonzero().tolist()}"
    finite = torch.isfinite(expected)
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected)
    assert_close(actual[finite], expected[finite], atol[finite], name)


def finite_copy(t):
    return torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0).to(t.dtype)


def poison(kind, q, c, q_mask, c_mask, paired):
    """Non-finite values in valid or masked tokens. c tokens are indexed (b, j) or, per
    query, (a, n, j). Returns the poisoned (q, c, q_mask, c_mask)."""
    q, c, q_mask, c_mask = q.clone(), c.clone(), q_mask.clone(), c_mask.clone()
    tok = lambda b, j: (b % c.shape[0], b % c.shape[1], j) if paired else (b, j)  # noqa: E731
    if kind == "nan-in-valid-query-token":
        q_mask[1, 2] = True
        q[1, 2, 3] = NAN
    elif kind == "nan-in-valid-candidate-token":
        c_mask[tok(2, 4)] = True
        c[tok(2, 4) + (0,)] = NAN
    elif kind == "inf-in-valid-candidate-token":  # +-inf similarities, NaN where q_d = 0
        c_mask[tok(0, 1)] = True
        c[tok(0, 1) + (5,)] = INF
    elif kind == "all-minus-inf-prefix":
        # every similarity with candidate 1 is -inf (q > 0, its tokens hold -inf): its valid
        # prefixes score -inf, the prefixes j < 2 (masked) contribute 0, and the argmax is the
        # lowest valid token. The masked tokens hold -inf too: never read.
        q.copy_(q.abs() + 0.25)
        sel = (slice(None), 1) if paired else (1,)
        c[sel + (slice(None), 0)] = -INF
        c_mask[sel + (slice(None),)] = True
        c_mask[sel + (slice(0, 2),)] = False
    elif kind == "plus-inf-candidates":  # two candidates whose every similarity is +inf
        q.copy_(q.abs() + 0.25)
        for b in (0, 3):
            c[tok(b, 0)[:-1] + (slice(None), 0)] = INF
            c_mask[tok(b, 0)[:-1]] = True
    elif kind == "every-similarity-minus-inf":
        q.copy_(q.abs() + 0.25)
        c[..., 0] = -INF
        c_mask[...] = True
    elif kind == "masked-tokens-hold-nan-and-inf":
        q[~q_mask] = NAN
        c[~c_mask] = INF
        q[tuple((~q_mask).nonzero()[0].tolist()) + (0,)] = -INF
        c[tuple((~c_mask).nonzero()[-1].tolist()) + (1,)] = NAN
    else:
        raise ValueError(kind)
    return q, c, q_mask, c_mask


NONFINITE = ["nan-in-valid-query-token", "nan-in-valid-candidate-token", "inf-in-valid-candidate-token",
             "all-minus-inf-prefix", "masked-tokens-hold-nan-and-inf"]
NF_GROUPS = ((1, 1), (2, 3), (5, 7), (3, 5))


def nonfinite_inputs(kind, paired, dtype, seed=41):
    gen = torch.Generator().manual_seed(seed)
    q = exact_values((4, 5, 16), gen, dtype)
    c = exact_values((4, 3, 7, 16) if paired else (6, 7, 16), gen, dtype)
    q_mask = torch.rand(4, 5, generator=gen) > 0.3
    c_mask = torch.rand(c.shape[:-1], generator=gen) > 0.3
    return poison(kind, q, c, q_mask, c_mask, paired)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("paired", [False, True], ids=["in-batch", "paired"])
@pytest.mark.parametrize("kind", NONFINITE)
def test_nonfinite_scores_and_gradients_follow_the_contract(runner, kind, paired, dtype):
    name, dev = runner
    q, c, q_mask, c_mask = nonfinite_inputs(kind, paired, dtype)
    gen = torch.Generator().manual_seed(42)
    grad = exact_values((len(NF_GROUPS), 4, c.shape[1] if paired else 6), gen)
    ops = ops_of(name)
    op = "maxsim_paired_grouped" if paired else "maxsim_grouped"
    args = [*on(dev, q, c), *split(NF_GROUPS), *on(dev, q_mask, c_mask)]
    out, _argmax = getattr(ops, op)(*args)
    dq, dc = getattr(ops, op + "_backward")(grad.to(dev), *args, [True, True])
    expected = reference_scores(paired)(q.double(), c.double(), NF_GROUPS, q_mask, c_mask)
    qf, cf = finite_copy(q), finite_copy(c)
    tol = paired_tolerance(qf, cf, NF_GROUPS) if paired else score_tolerance(qf, cf, NF_GROUPS)
    assert_same_nonfinite(out, expected, tol, f"{kind} scores")
    dq_r, dc_r = dense_scores_backward(grad, q, c, NF_GROUPS, q_mask, c_mask, paired)
    n_terms = 6 * len(NF_GROUPS) * 5
    assert_same_nonfinite(dq, dq_r, grad_tolerance(dq_r.nan_to_num(0, 0, 0), dtype, n_terms, torch.tensor(1.0)),
                          f"{kind} dq")
    assert_same_nonfinite(dc, dc_r, grad_tolerance(dc_r.nan_to_num(0, 0, 0), dtype, n_terms, torch.tensor(1.0)),
                          f"{kind} dc")
    assert (dq.cpu()[~q_mask] == 0).all() and (dc.cpu()[~c_mask] == 0).all(), "masked tokens get exactly 0"
    if kind.startswith("masked"):  # never read: bitwise the results with zeros there
        clean = [*on(dev, q.masked_fill(~q_mask[..., None], 0), c.masked_fill(~c_mask[..., None], 0))]
        cargs = [*clean, *split(NF_GROUPS), *on(dev, q_mask, c_mask)]
        assert torch.equal(out, getattr(ops, op)(*cargs)[0])
        for got, want in zip((dq, dc), getattr(ops, op + "_backward")(grad.to(dev), *cargs, [True, True])):
            assert torch.equal(got, want)
        assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dc).all()
    else:  # the poison is read: something is non-finite, as in the reference
        assert not torch.isfinite(expected).all() and not torch.isfinite(out).all()


LOSS_NONFINITE = {
    # poison kind -> the operands it goes into: in-batch candidates and/or hard negatives
    "nan-in-valid-query-token": ("c",),
    "nan-in-valid-candidate-token": ("hn",),
    "inf-in-valid-candidate-token": ("c",),
    "all-minus-inf-prefix": ("c",),
    "plus-inf-candidates": ("c", "hn"),  # lse = +inf (torch.logsumexp): splits, merge, then hn
    "every-similarity-minus-inf": ("c", "hn"),  # every logit -inf: lse = -inf, terms NaN
    "masked-tokens-hold-nan-and-inf": ("c", "hn"),
}
# r_c > 32: one candidate per tile, so the in-batch log-sum-exp runs in several splits that
# the host merges (the emulator reports 3 SMs).
LOSS_NF_GROUPS = ((1, 1), (2, 3), (5, 40), (3, 35))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", list(LOSS_NONFINITE))
def test_nonfinite_loss_follows_the_contract(runner, kind, dtype):
    """terms / lse match torch.logsumexp and cross-entropy on infinities and NaN; the
    gradients are NaN exactly where the reference's are (dense_infonce_backward)."""
    name, dev = runner
    gen = torch.Generator().manual_seed(43)
    q = exact_values((4, 5, 16), gen, dtype)
    c = exact_values((6, 40, 16), gen, dtype)
    hn = exact_values((4, 2, 40, 16), gen, dtype)
    q_mask = torch.rand(4, 5, generator=gen) > 0.3
    c_mask = torch.rand(6, 40, generator=gen) > 0.3
    hn_mask = torch.rand(4, 2, 40, generator=gen) > 0.3
    if "c" in LOSS_NONFINITE[kind]:
        q, c, q_mask, c_mask = poison(kind, q, c, q_mask, c_mask, paired=False)
    if "hn" in LOSS_NONFINITE[kind]:
        q, hn, q_mask, hn_mask = poison(kind, q, hn, q_mask, hn_mask, paired=True)
    labels = torch.tensor([1, 0, 5, 2])
    scale = 0.5
    groups = LOSS_NF_GROUPS
    grad = torch.tensor([[1.0, 0.5, -1.0, 2.0]]).expand(len(groups), 4).contiguous()
    ops = ops_of(name)
    args = [*on(dev, q, c, hn, labels), *split(groups), scale, *on(dev, q_mask, c_mask, hn_mask)]
    terms, lse, _ = ops.matryoshka_infonce(*args)
    dq, dc, dhn = ops.matryoshka_infonce_backward(grad.to(dev), lse, *args, [True, True, True])
    dq_r, dc_r, dhn_r, terms_r, lse_r = dense_infonce_backward(grad, q, c, hn, labels, groups, scale, q_mask,
                                                                c_mask, hn_mask)
    assert_same_nonfinite(lse, lse_r, 1e-5 * (1 + lse_r.nan_to_num(0, 0, 0).abs()), f"{kind} lse")
    assert_same_nonfinite(terms, terms_r, 1e-5 * (1 + terms_r.nan_to_num(0, 0, 0).abs()), f"{kind} terms")
    u = UNIT_ROUNDOFF[dtype]
    for label, got, want in (("dq", dq, dq_r), ("dc", dc, dc_r), ("dhn", dhn, dhn_r)):
        w = want.nan_to_num(0, 0, 0)
        assert_same_nonfinite(got, want, 4 * u * w.abs() + 1e-4 * (1 + w.abs().max()), f"{kind} {label}")
    for g, m in ((dq, q_mask), (dc, c_mask), (dhn, hn_mask)):
        assert (g.cpu()[~m] == 0).all(), "masked tokens get exactly 0"
    if kind.startswith("masked"):
        assert torch.isfinite(terms).all() and all(torch.isfinite(g).all() for g in (dq, dc, dhn))
    else:
        assert not torch.isfinite(terms_r).all() and not torch.isfinite(terms).all()


@pytest.mark.parametrize("kind", NONFINITE)
def test_dense_oracle_is_autograd_of_the_reference(kind):
    """Guards the oracle of the non-finite tests: the closed form equals autograd through the
    reference forward (einsum, amax / argmax), NaN and infinities included."""
    for paired in (False, True):
        q, c, q_mask, c_mask = nonfinite_inputs(kind, paired, torch.float32)
        grad = torch.randn(len(NF_GROUPS), 4, c.shape[1] if paired else 6, dtype=torch.float64)
        got = dense_scores_backward(grad, q, c, NF_GROUPS, q_mask, c_mask, paired)
        qd, cd = q.double().requires_grad_(), c.double().requires_grad_()
        reference_scores(paired)(qd, cd, NF_GROUPS, q_mask, c_mask).backward(grad)
        for a, b in zip(got, (qd.grad, cd.grad)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            finite = torch.isfinite(b)
            assert_close(a[finite], b[finite], 1e-12, f"{kind} oracle")


# ---------------------------------------------------------------------------------------
# Determinism, races, labels, validation
# ---------------------------------------------------------------------------------------
def _run_everything(name, dev, seed=5):
    gen = torch.Generator().manual_seed(seed)
    q = normal_values((7, 16, 40), gen).to(dev).requires_grad_()
    c = normal_values((9, 64, 40), gen).to(dev).requires_grad_()
    hn = normal_values((7, 2, 64, 40), gen).to(dev).requires_grad_()
    qm, cm = random_masks(7, 16, 9, 64, gen)
    out = maxsim_grouped(q, c, DEFAULT_GROUPS, q_mask=qm.to(dev), c_mask=cm.to(dev), backend=name)
    out.backward(torch.randn(out.shape, generator=gen).to(dev))
    loss = matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, labels=torch.arange(7).to(dev), backend=name)
    loss.backward()
    paired = maxsim_paired_grouped(q, hn, DEFAULT_GROUPS, q_mask=qm.to(dev), backend=name)
    paired.backward(torch.randn(paired.shape, generator=gen).to(dev))
    return [t.detach().cpu().clone() for t in (out, loss, paired, q.grad, c.grad, hn.grad)]


def test_bitwise_deterministic(runner):
    name, dev = runner
    first, second = _run_everything(name, dev), _run_everything(name, dev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_emulator
def test_no_races_between_barriers():
    """The emulator replays every block with its threads in forward, reverse and shuffled
    order between barriers: a result that depends on the order is a race."""
    results = []
    try:
        for mode in (0, 1, 7):
            torch.ops.metaembed_emu.set_schedule(mode)
            results.append(_run_everything("cuda-emu", torch.device("cpu")))
    finally:
        torch.ops.metaembed_emu.set_schedule(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@requires_emulator
def test_emulator_really_launches_the_kernels():
    """Guard against a vacuous emulated sweep: one fused-loss forward + backward launches
    score, weight and both gradient kernels (in-batch and hard negatives), and a per-query
    forward + backward launches score, then score, weights, dq and dc."""
    before = launches()
    x = make_loss_inputs(k=1, seed=2)
    check_loss("cuda-emu", torch.device("cpu"), x, SMALL_GROUPS, k=1)
    # forward: in-batch + hard negatives; backward: (score, weights, dq, dc) x 2
    assert launches() - before == 2 + 8
    before = launches()
    q, c = exact_values((3, 4, 8), torch.Generator()), exact_values((3, 2, 5, 8), torch.Generator())
    check_backward("cuda-emu", torch.device("cpu"), q, c, None, None, SMALL_GROUPS[:3], seed=1, paired=True)
    assert launches() - before == 1 + 4


@requires_emulator
def test_labels_out_of_range_raise_value_error_naming_labels():
    """Checked inside the ops on the host for CPU tensors (device tensors: a device-side
    assert, never a sync), before any kernel runs."""
    ops = torch.ops.metaembed_emu
    gen = torch.Generator().manual_seed(44)
    q, c, hn = normal_values((2, 3, 8), gen), normal_values((4, 5, 8), gen), normal_values((2, 1, 5, 8), gen)
    terms, lse, _ = ops.matryoshka_infonce(q, c, hn, torch.tensor([0, 3]), [1], [1], 1.0, None, None, None)
    before = launches()
    for bad in ([0, 4], [-1, 0], [7, 9]):
        labels = torch.tensor(bad)
        with pytest.raises(ValueError, match="labels"):
            ops.matryoshka_infonce(q, c, hn, labels, [1], [1], 1.0, None, None, None)
        with pytest.raises(ValueError, match="labels"):
            ops.matryoshka_infonce_backward(terms, lse, q, c, hn, labels, [1], [1], 1.0, None, None, None,
                                            [True, True, True])
        with pytest.raises(ValueError, match="labels"):
            matryoshka_infonce(q, c, hard_negatives=hn, labels=labels, backend="cuda-emu")
    with pytest.raises(ValueError, match="labels"):  # the default arange(Nq) needs Nq <= Nc
        matryoshka_infonce(normal_values((5, 3, 8), gen), c, backend="cuda-emu")
    assert launches() == before


def bad_cases():
    """(label, op, args) of direct op calls that must raise, with the messages every backend
    shares (csrc/common/checks.h)."""
    gen = torch.Generator().manual_seed(45)
    q, c = normal_values((2, 3, 8), gen), normal_values((4, 5, 8), gen)
    cp, hn = normal_values((2, 4, 5, 8), gen), normal_values((2, 1, 5, 8), gen)
    labels, g3, g2 = torch.tensor([0, 1]), torch.zeros(1, 2, 4), torch.zeros(1, 2)
    m = [1], [1]
    return [
        ("group out of range", "maxsim_grouped", (q, c, [4], [1], None, None)),
        ("groups of unequal length", "maxsim_grouped", (q, c, [1, 2], [1], None, None)),
        ("D mismatch", "maxsim_grouped", (q, c[:, :, :4], *m, None, None)),
        ("q not 3-D", "maxsim_grouped", (q[0], c, *m, None, None)),
        ("dtype mismatch", "maxsim_grouped", (q, c.half(), *m, None, None)),
        ("integer q", "maxsim_grouped", (q.int(), c.int(), *m, None, None)),
        ("q_mask shape", "maxsim_grouped", (q, c, *m, torch.ones(2, 4, dtype=torch.bool), None)),
        ("c_mask dtype", "maxsim_grouped", (q, c, *m, None, torch.ones(4, 5))),
        ("grad shape", "maxsim_grouped_backward", (g3[:, :1], q, c, *m, None, None, [True, True])),
        ("paired c 3-D", "maxsim_paired_grouped", (q, c, *m, None, None)),
        ("paired B mismatch", "maxsim_paired_grouped", (q, cp[:1], *m, None, None)),
        ("paired c_mask shape", "maxsim_paired_grouped", (q, cp, *m, None, torch.ones(2, 5, dtype=torch.bool))),
        ("paired grad shape", "maxsim_paired_grouped_backward", (g3[:, :, :3], q, cp, *m, None, None, [True, True])),
        ("paired group out of range", "maxsim_paired_grouped", (q, cp, [1], [6], None, None)),
        ("hard negatives shape", "matryoshka_infonce", (q, c, hn[:, :, :4], labels, *m, 1.0, None, None, None)),
        ("scale", "matryoshka_infonce", (q, c, hn, labels, *m, -1.0, None, None, None)),
        ("labels dtype", "matryoshka_infonce", (q, c, hn, labels.int(), *m, 1.0, None, None, None)),
        ("labels shape", "matryoshka_infonce", (q, c, hn, labels[:1], *m, 1.0, None, None, None)),
        ("labels value", "matryoshka_infonce", (q, c, hn, torch.tensor([0, 4]), *m, 1.0, None, None, None)),
        ("lse shape", "matryoshka_infonce_backward",
         (g2, g2[:, :1], q, c, hn, labels, *m, 1.0, None, None, None, [True, True, True])),
    ]


@pytest.mark.parametrize("label,op,args", [pytest.param(*case, id=case[0]) for case in bad_cases()])
def test_bad_arguments_raise_the_messages_of_every_backend(runner, label, op, args):
    name, dev = runner
    if name == "cuda" and label == "labels value":
        pytest.skip("label values of CUDA tensors are checked by a device-side assert (no host sync)")
    args = [a.to(dev) if torch.is_tensor(a) else a for a in args]
    with pytest.raises((ValueError, TypeError)) as err:
        getattr(ops_of(name), op)(*args)
    assert len(str(err.value).splitlines()[0]) > 10
    if _extension.has_kernel("cpu"):  # the CPU backend raises the same error, word for word
        cpu_args = [a.cpu() if torch.is_tensor(a) else a for a in args]
        with pytest.raises(err.type) as cpu_err:
            getattr(torch.ops.metaembed, op)(*cpu_args)
        assert str(err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]


def test_bad_arguments_the_cuda_backend_adds(runner):
    name, dev = runner
    ops = ops_of(name)
    q, c = torch.randn(2, 3, 8, device=dev), torch.randn(4, 5, 8, device=dev)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        ops.maxsim_grouped(q.double(), c.double(), [1], [1], None, None)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        ops.maxsim_paired_grouped(q.double(), c[None, :2].double().expand(2, 2, 5, 8), [1], [1], None, None)
    if name == "cuda":
        with pytest.raises(ValueError, match="device"):
            ops.maxsim_grouped(q, c.cpu(), [1], [1], None, None)


# ---------------------------------------------------------------------------------------
# Registration (no GPU needed) and GPU-only properties
# ---------------------------------------------------------------------------------------
def test_dispatch_keys_registered_when_built_with_cuda():
    if not _extension.is_loaded():
        pytest.skip("C++ extension not built")
    if not getattr(_extension._C, "built_with_cuda", lambda: False)():
        pytest.skip("extension built without CUDA (METAEMBED_BUILD_CUDA=0 or no toolkit)")
    for op in OP_NAMES:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed::{op}", key), (op, key)
    assert _extension.has_kernel("cuda")


@requires_emulator
def test_emulator_registers_every_op():
    for op in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed_emu::{op}", "CPU"), op


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_gpu_memory_stays_small_for_a_large_forward():
    """maxsim_grouped (Nq=64, Nc=20000, Rq=16, Rc=64, D=128, bf16) allocates the output and
    nothing of the order of the similarity tensor (which would be 4 GB)."""
    q = torch.randn(64, 16, 128, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(20000, 64, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * 4 + (8 << 20), extra


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_gpu_unwanted_gradient_is_not_allocated():
    """output_mask (False for dc): no fp32 dc accumulator (2x the bf16 c) is allocated."""
    q = torch.randn(4, 16, 128, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(4096, 64, 128, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(len(DEFAULT_GROUPS), 4, 4096, device="cuda")
    grq, grc = split(DEFAULT_GROUPS)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dq, dc = torch.ops.metaembed.maxsim_grouped_backward(grad, q, c, grq, grc, None, None, [True, False])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert dc.shape == (0,) and dq.shape == q.shape
    assert extra < c.numel() * c.element_size(), extra


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_runs_on_the_current_stream():
    gen = torch.Generator().manual_seed(1)
    q, c = normal_values((8, 16, 64), gen).cuda(), normal_values((33, 64, 64), gen).cuda()
    expected = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = maxsim_grouped(q, c, DEFAULT_GROUPS, backend="cuda")
    side.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_more_than_2_pow_31_elements():
    nc, rc, d = 8200, 64, 4096
    gen = torch.Generator().manual_seed(5)
    c = torch.zeros(nc, rc, d, dtype=torch.bfloat16, device="cuda")
    tail = normal_values((4, rc, d), gen, torch.bfloat16)
    c[-4:] = tail.cuda()
    q = normal_values((2, 16, d), gen, torch.bfloat16)
    out = maxsim_grouped(q.cuda(), c, DEFAULT_GROUPS, backend="cuda").cpu()
    ref = reference.maxsim_grouped(q.double(), tail.double(), DEFAULT_GROUPS)
    assert_close(out[:, :, -4:], ref, score_tolerance(q, tail, DEFAULT_GROUPS), "far candidates")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_paired_more_than_2_pow_31_elements():
    """Per-query candidates past 2^31 elements: 64-bit offsets in the per-query mode."""
    b, n, rc, d = 2, 4100, 64, 4096  # c: 2.15e9 elements
    gen = torch.Generator().manual_seed(6)
    c = torch.zeros(b, n, rc, d, dtype=torch.bfloat16, device="cuda")
    tail = normal_values((3, rc, d), gen, torch.bfloat16)
    c[-1, -3:] = tail.cuda()
    q = normal_values((b, 16, d), gen, torch.bfloat16)
    out = maxsim_paired_grouped(q.cuda(), c, DEFAULT_GROUPS, backend="cuda").cpu()
    ref = reference.maxsim_grouped(q[-1:].double(), tail.double(), DEFAULT_GROUPS)
    assert_close(out[:, -1:, -3:], ref, score_tolerance(q[-1:], tail, DEFAULT_GROUPS), "far paired candidates")


GPU_BACKENDS = ("triton", "cuda")
GPU_OPS = ("maxsim_grouped", "matryoshka_infonce", "maxsim_paired_grouped")


def gpu_skip(name, op):
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    backend = backends.get_backend(name)
    reason = backend.unavailable_reason("cuda", torch.bfloat16, 16, 64)
    if reason:
        return reason
    if not hasattr(getattr(torch.ops, backend.op_namespace), backend.op_prefix + op):
        return f"backend {name!r} has no {op} op"
    return None


def training_problem(name, op, seed=0):
    """Leaf fp32 parameters and a loss over their bf16 casts that runs `op` on `backend`."""
    gen = torch.Generator().manual_seed(seed)
    q = normal_values((8, 16, 64), gen).cuda().requires_grad_()
    c_shape = (8, 3, 64, 64) if op == "maxsim_paired_grouped" else (12, 64, 64)
    c = normal_values(c_shape, gen).cuda().requires_grad_()
    hn = normal_values((8, 2, 64, 64), gen).cuda().requires_grad_()
    labels = torch.randperm(12, generator=gen)[:8].cuda()
    bf = torch.bfloat16

    def loss_fn():
        if op == "matryoshka_infonce":
            return matryoshka_infonce(q.to(bf), c.to(bf), DEFAULT_GROUPS, hard_negatives=hn.to(bf), labels=labels,
                                      backend=name)
        scores = scores_fn(op == "maxsim_paired_grouped")(q.to(bf), c.to(bf), DEFAULT_GROUPS, backend=name)
        return scores.square().mean()

    return [q, c, hn] if op == "matryoshka_infonce" else [q, c], loss_fn


@pytest.mark.gpu
@pytest.mark.parametrize("op", GPU_OPS)
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_forward_and_backward_never_sync_with_the_host(name, op):
    skip = gpu_skip(name, op)
    if skip:
        pytest.skip(skip)
    params, loss_fn = training_problem(name, op)
    loss_fn().backward()  # warm-up: kernel compilation and autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in params)


@pytest.mark.gpu
@pytest.mark.parametrize("op", GPU_OPS)
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_training_step_captures_in_a_cuda_graph(name, op):
    """Forward, backward and an SGD step captured in one CUDA graph; two replays equal two
    eager steps from the same start."""
    skip = gpu_skip(name, op)
    if skip:
        pytest.skip(skip)
    params, loss_fn = training_problem(name, op)
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.05)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    def restart():
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)

    restart()
    losses = []
    for _ in range(2):
        graph.replay()  # the captured backward writes the grads afresh (set_to_none above)
        losses.append(static_loss.clone())
    torch.cuda.synchronize()
    replayed = [p.detach().clone() for p in params]

    restart()
    eager = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        eager.append(step().detach())
    for got, want in zip(losses, eager):
        assert_close(got, want, 1e-6 * (1 + want.abs()), "graph loss")
    for got, p in zip(replayed, params):
        assert_close(got, p.detach(), 1e-6 * (1 + p.detach().abs()), "graph parameters")
    assert not torch.equal(replayed[0], start[0])  # the steps really moved the parameters
