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
Nothing here can measure speed; benchmarks/ does that on a GPU.
"""
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
    reference,
)

ROOT = Path(__file__).resolve().parents[1]
OPS = _extension.OP_NAMES


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
    _autograd.register_maxsim("metaembed_emu::maxsim_grouped", "metaembed_emu::maxsim_grouped_backward")
    _autograd.register_infonce("metaembed_emu::matryoshka_infonce", "metaembed_emu::matryoshka_infonce_backward")
    return None


class EmulatedCudaBackend(backends.OpBackend):
    """The CUDA kernels on CPU tensors through the emulator (ops metaembed_emu::*)."""

    name = "cuda-emu"
    op_namespace = "metaembed_emu"

    def unavailable_reason(self, device, dtype, groups=None):  # any groups: no tile limits
        if device.type != "cpu":
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


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.gpu) if name == "cuda" else name for name in RUNNERS])
def runner(request):
    """(backend name, device) of each runner that can run here."""
    device, skip = RUNNERS[request.param]
    if skip:
        pytest.skip(skip)
    return request.param, torch.device(device)


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


SWEEP = [pytest.param(case, dtype, id=f"{case}-{dtype_id(dtype)}") for case in sweep_cases() for dtype in DTYPES]


def make_inputs(case, dtype, values):
    gen = torch.Generator().manual_seed(case.seed)
    q = values((case.nq, case.rq, case.d), gen, dtype)
    c = values((case.nc, case.rc, case.d), gen, dtype)
    q_mask, c_mask = random_masks(case.nq, case.rq, case.nc, case.rc, gen) if case.masked else (None, None)
    groups = random_groups(case.rq, case.rc, random.Random(case.seed))
    return q, c, q_mask, c_mask, groups


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


def check_backward(name, dev, q, c, q_mask, c_mask, groups, seed):
    """Exact-arithmetic inputs: argmax decisions (ties included) agree with the reference,
    so gradients must match up to fp32 accumulation and the final rounding."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(len(groups), q.shape[0], c.shape[0], generator=gen)
    qk, ck = [t.detach().to(dev).requires_grad_() for t in (q, c)]
    maxsim_grouped(qk, ck, groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name).backward(
        grad.to(dev)
    )
    qr, cr = q.double().requires_grad_(), c.double().requires_grad_()
    reference.maxsim_grouped(qr, cr, groups, q_mask, c_mask).backward(grad.double())
    assert qk.grad.dtype == q.dtype and ck.grad.dtype == c.dtype
    g_abs = torch.tensor(grad.abs().max().item())
    tol_q = grad_tolerance(qr.grad, q.dtype, c.shape[0] * len(groups), g_abs)
    tol_c = grad_tolerance(cr.grad, q.dtype, q.shape[0] * q.shape[1] * len(groups), g_abs)
    assert_close(qk.grad.cpu(), qr.grad, tol_q, f"{name} dq")
    assert_close(ck.grad.cpu(), cr.grad, tol_c, f"{name} dc")


@pytest.mark.parametrize("case,dtype", SWEEP)
def test_backward_matches_reference(runner, case, dtype):
    q, c, q_mask, c_mask, groups = make_inputs(case, dtype, exact_values)
    check_backward(*runner, q, c, q_mask, c_mask, groups, case.seed + 1)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", list(EDGE_SHAPES), ids=str)
def test_blocking_edge_cases(runner, shape, dtype):
    s = EDGE_SHAPES[shape]
    gen = torch.Generator().manual_seed(7)
    q = exact_values((s["nq"], s["rq"], s["d"]), gen, dtype)
    c = exact_values((s["nc"], s["rc"], s["d"]), gen, dtype)
    q_mask, c_mask = random_masks(s["nq"], s["rq"], s["nc"], s["rc"], gen)
    groups = ((1, 1), (s["rq"], s["rc"]), (max(1, s["rq"] // 2), max(1, s["rc"] - 70)), (s["rq"] - 1 or 1, 65 % s["rc"] + 1))
    name, dev = runner
    out = maxsim_grouped(*on(dev, q, c), groups, q_mask=on(dev, q_mask)[0], c_mask=on(dev, c_mask)[0], backend=name)
    expected = reference.maxsim_grouped(q.double(), c.double(), groups, q_mask, c_mask)
    assert_close(out.cpu(), expected, score_tolerance(q, c, groups), f"{shape} scores")
    check_backward(name, dev, q, c, q_mask, c_mask, groups, seed=8)


@pytest.mark.parametrize("seed", [*range(12), 114, 282])
def test_random_shapes(runner, seed):
    """Random sizes (sometimes past one row tile or one 64-token chunk), groups, masks and
    dtypes: scores, gradients and the fused loss with hard negatives."""
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


def test_ties_masks_and_empty_prefixes(runner):
    name, dev = runner
    q = torch.ones(2, 3, 8)
    c = torch.zeros(4, 6, 8)
    c[:, 1] = c[:, 3] = c[:, 4] = 1.0  # tokens 1, 3 and 4 tie; 1 must get all the gradient
    cg = c.to(dev).requires_grad_()
    maxsim_grouped(q.to(dev), cg, ((3, 6), (1, 2)), backend=name).sum().backward()
    expected = torch.zeros_like(c)
    expected[:, 1] = 2 * (3 + 1)
    assert torch.equal(cg.grad.cpu(), expected)

    q = torch.ones(1, 2, 4)
    c = -torch.ones(1, 4, 4)
    c_mask = torch.tensor([[False, False, True, True]])
    out = maxsim_grouped(q.to(dev), c.to(dev), ((2, 1), (2, 2), (2, 3), (1, 4)), c_mask=c_mask.to(dev), backend=name)
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


def test_large_logits_stay_finite(runner):
    name, dev = runner
    x = make_loss_inputs(nq=6, nc=9, rq=4, rc=7, d=24, k=1, seed=12)
    q, c = (x["q"] * 4).to(dev).requires_grad_(), (x["c"] * 4).to(dev).requires_grad_()
    loss = matryoshka_infonce(q, c, SMALL_GROUPS, temperature=0.01, labels=x["labels"].to(dev), backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


# ---------------------------------------------------------------------------------------
# Determinism, races, validation
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
    return [t.detach().cpu().clone() for t in (out, loss, q.grad, c.grad, hn.grad)]


def test_bitwise_deterministic(runner):
    name, dev = runner
    first, second = _run_everything(name, dev), _run_everything(name, dev)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_races_between_barriers():
    """The emulator replays every block with its threads in forward, reverse and shuffled
    order between barriers: a result that depends on the order is a race."""
    if EMU_SKIP:
        pytest.skip(EMU_SKIP)
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


def test_emulator_really_launches_the_kernels():
    """Guard against a vacuous emulated sweep: one fused-loss forward + backward launches
    score, weight and both gradient kernels (in-batch and hard negatives)."""
    if EMU_SKIP:
        pytest.skip(EMU_SKIP)
    before = torch.ops.metaembed_emu.launch_count()
    x = make_loss_inputs(k=1, seed=2)
    check_loss("cuda-emu", torch.device("cpu"), x, SMALL_GROUPS, k=1)
    # forward: in-batch + hard negatives; backward: (score, weights, dq, dc) x 2
    assert torch.ops.metaembed_emu.launch_count() - before == 2 + 8


def test_bad_arguments_raise(runner):
    name, dev = runner
    ns = torch.ops.metaembed_emu if name == "cuda-emu" else torch.ops.metaembed
    q, c = torch.randn(2, 3, 8, device=dev), torch.randn(4, 5, 8, device=dev)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        ns.maxsim_grouped(q.double(), c.double(), [1], [1], None, None)
    with pytest.raises(ValueError, match="out of range"):
        ns.maxsim_grouped(q, c, [4], [1], None, None)
    with pytest.raises(ValueError):
        ns.maxsim_grouped(q, c[:, :, :4], [1], [1], None, None)
    with pytest.raises(ValueError, match="labels"):
        hn = torch.zeros(2, 0, 5, 8, device=dev)
        ns.matryoshka_infonce(q, c, hn, torch.tensor([0, 4], device=dev), [1], [1], 1.0, None, None, None)
    if name == "cuda":
        with pytest.raises(ValueError, match="device"):
            ns.maxsim_grouped(q, c.cpu(), [1], [1], None, None)


# ---------------------------------------------------------------------------------------
# Registration (no GPU needed) and GPU-only properties
# ---------------------------------------------------------------------------------------
def test_dispatch_keys_registered_when_built_with_cuda():
    if not _extension.is_loaded():
        pytest.skip("C++ extension not built")
    if not getattr(_extension._C, "built_with_cuda", lambda: False)():
        pytest.skip("extension built without CUDA (METAEMBED_BUILD_CUDA=0 or no toolkit)")
    for op in OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metaembed::{op}", key), (op, key)
    assert _extension.has_kernel("cuda")


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


@pytest.mark.slow
@pytest.mark.gpu
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
