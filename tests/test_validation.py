"""Bad inputs raise ValueError / TypeError naming the argument, from the Python API and from
direct op calls alike, on every backend (one validator: metaembed_kernels/_validation.py and
its C++ mirror csrc/common/checks.h); backend selection errors are explicit."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import cpu_kernel_backends, op_backends, ops_of, requires_extension
from metaembed_kernels import (
    DEFAULT_GROUPS,
    BackendUnavailableError,
    MatryoshkaInfoNCELoss,
    matryoshka_infonce,
    maxsim,
    maxsim_grouped,
    maxsim_paired_grouped,
    select_backend,
)

Q = torch.randn(3, 4, 8)
C = torch.randn(5, 6, 8)
BACKENDS = cpu_kernel_backends() + ["reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q=torch.randn(3, 8)), ValueError, r"q must have shape \(Nq, Rq, D\)"),
        (dict(c=torch.randn(5, 6, 8, 1)), ValueError, r"c must have shape \(Nc, Rc, D\)"),
        (dict(c=torch.randn(5, 6, 9)), ValueError, r"same embedding dim D as q: q has D=8"),
        (dict(c=torch.randn(5, 6, 8, dtype=torch.float16)), TypeError, r"c must have the dtype of q"),
        (dict(q=torch.randint(0, 3, (3, 4, 8))), TypeError, r"q must be float32, float16 or bfloat16"),
        (dict(c=torch.randn(5, 6, 8, device="meta")), ValueError, r"c must be on the device of q"),
        (dict(q=torch.randn(3, 4, 0), c=torch.randn(5, 6, 0)), ValueError, r"D >= 1"),
        (dict(q="not a tensor"), TypeError, r"q must be a torch.Tensor"),
        (dict(groups=[]), ValueError, r"at least one"),
        (dict(groups=[(5, 1)]), ValueError, r"groups\[0\] = \(5, 1\) is out of range.*Rq=4"),
        (dict(groups=[(1, 1), (1, 7)]), ValueError, r"groups\[1\] = \(1, 7\) is out of range.*Rc=6"),
        (dict(groups=[(0, 1)]), ValueError, r"out of range"),
        (dict(groups=[(1.5, 1)]), TypeError, r"pair of ints"),
        (dict(groups=[(True, 1)]), TypeError, r"pair of ints"),
        (dict(groups=(1, 1)), TypeError, r"groups\[0\] must be an \(r_q, r_c\) pair"),
        (dict(groups="11"), TypeError, r"groups must be a sequence"),
        (dict(q_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"q_mask must have shape \(Nq, Rq\) = \(3, 4\)"),
        (dict(c_mask=torch.ones(5, 6)), TypeError, r"c_mask must be a bool tensor"),
        (dict(c_mask=[[True]]), TypeError, r"c_mask must be a bool tensor"),
        (dict(backend="gpu"), ValueError, r"backend must be one of"),
        (dict(backend=3), TypeError, r"backend must be a string"),
    ],
)
def test_maxsim_grouped_rejects(backend, kwargs, error, match):
    args = dict(q=Q, c=C, groups=None, backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        maxsim_grouped(args.pop("q"), args.pop("c"), args.pop("groups"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(labels=torch.tensor([0, 1, 5])), ValueError, r"need 0 <= labels < Nc=5, got values in \[0, 5\]"),
        (dict(labels=torch.tensor([-1, 1, 2])), ValueError, r"labels"),
        (dict(labels=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError, r"labels must be an int64"),
        (dict(labels=torch.tensor([0, 1])), ValueError, r"labels must have shape \(Nq,\) = \(3,\)"),
        (dict(hard_negatives=torch.randn(3, 2, 5, 8)), ValueError, r"hard_negatives must have shape \(Nq, K, Rc, D\)"),
        (dict(hard_negatives=torch.randn(2, 2, 6, 8)), ValueError, r"hard_negatives must have shape"),
        (dict(hard_negatives=torch.randn(3, 6, 8)), ValueError, r"hard_negatives must have shape \(Nq, K, Rc, D\)"),
        (dict(hard_negatives=torch.randn(3, 1, 6, 8).half()), TypeError, r"hard_negatives must have the dtype"),
        (dict(hard_negatives=torch.randn(3, 1, 6, 8), hard_negatives_mask=torch.ones(3, 1, 5, dtype=torch.bool)),
         ValueError, r"hard_negatives_mask must have shape \(Nq, K, Rc\)"),
        (dict(hard_negatives_mask=torch.ones(3, 1, 6, dtype=torch.bool)), ValueError, r"without hard_negatives"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number > 0, got inf"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, r"temperature"),
        (dict(weights=(1.0, 2.0)), ValueError, r"one entry per group \(G=1\)"),
        (dict(weights=("a",)), TypeError, r"weights\[0\]"),
        (dict(reduction="none"), ValueError, r"reduction must be 'mean' or 'sum'"),
    ],
)
def test_matryoshka_infonce_rejects(backend, kwargs, error, match):
    with pytest.raises(error, match=match):
        matryoshka_infonce(Q, C, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(c=torch.randn(5, 6, 8)), ValueError, r"c must have shape \(B, N, Rc, D\)"),
        (dict(c=torch.randn(2, 2, 6, 8)), ValueError, r"one row of candidates per query: q has B=3"),
        (dict(c=torch.randn(3, 2, 6, 9)), ValueError, r"same embedding dim D as q"),
        (dict(c_mask=torch.ones(3, 2, 5, dtype=torch.bool)), ValueError, r"c_mask must have shape \(B, N, Rc\)"),
        (dict(q_mask=torch.ones(3, 4)), TypeError, r"q_mask must be a bool tensor of shape \(B, Rq\)"),
        (dict(groups=[(1, 7)]), ValueError, r"groups\[0\] = \(1, 7\) is out of range.*Rc=6"),
    ],
)
def test_maxsim_paired_grouped_rejects(backend, kwargs, error, match):
    args = dict(q=Q, c=torch.randn(3, 2, 6, 8), groups=None, backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        maxsim_paired_grouped(args.pop("q"), args.pop("c"), args.pop("groups"), **args)


# Direct op calls: every backend's ops, the same bad cases, the same error types and names.
HN0 = torch.randn(3, 0, 6, 8)
LABELS = torch.tensor([0, 1, 2])
OP_CASES = [
    ("maxsim_grouped", (Q, torch.randn(5, 6, 7), [1], [1], None, None), ValueError, "embedding dim"),
    ("maxsim_grouped", (Q, C.half(), [1], [1], None, None), TypeError, "dtype of q"),
    ("maxsim_grouped", (Q, C.int(), [1], [1], None, None), TypeError, "c must be float32"),
    ("maxsim_grouped", (Q, C, [5], [1], None, None), ValueError, r"groups\[0\] = \(5, 1\) is out of range"),
    ("maxsim_grouped", (Q, C, [1, 2], [1], None, None), ValueError, "same length"),
    ("maxsim_grouped", (Q, C, [], [], None, None), ValueError, "at least one"),
    ("maxsim_grouped", (Q, C, [1], [1], torch.ones(3, 4), None), TypeError, "q_mask must be a bool"),
    ("maxsim_grouped", (Q, C, [1], [1], None, torch.ones(5, 5, dtype=torch.bool)), ValueError,
     "c_mask must have shape"),
    ("maxsim_grouped", (Q[0], C, [1], [1], None, None), ValueError, "q must have shape"),
    ("maxsim_paired_grouped", (Q, C, [1], [1], None, None), ValueError, r"c must have shape \(B, N, Rc, D\)"),
    ("maxsim_paired_grouped", (Q, torch.randn(2, 1, 6, 8), [1], [1], None, None), ValueError, "c must have shape"),
    ("maxsim_grouped_backward", (torch.ones(1, 3, 4), Q, C, [1], [1], None, None, [True, True]), ValueError,
     r"grad must have shape"),
    ("matryoshka_infonce", (Q, C, HN0, torch.tensor([0, 9, 1]), [1], [1], 1.0, None, None, None), ValueError,
     r"labels must index the candidates c: need 0 <= labels < Nc=5"),
    ("matryoshka_infonce", (Q, C, HN0, torch.tensor([0, -1, 1]), [1], [1], 1.0, None, None, None), ValueError,
     r"labels must index the candidates c"),
    ("matryoshka_infonce", (Q, C, HN0, LABELS.int(), [1], [1], 1.0, None, None, None), TypeError,
     "labels must be int64"),
    ("matryoshka_infonce", (Q, C, HN0, LABELS[:2], [1], [1], 1.0, None, None, None), ValueError,
     r"labels must have shape \(Nq,\)"),
    ("matryoshka_infonce", (Q, C, HN0, LABELS, [1], [1], -1.0, None, None, None), ValueError,
     "scale must be finite and > 0"),
    ("matryoshka_infonce", (Q, C, HN0, LABELS, [1], [1], float("inf"), None, None, None), ValueError,
     "scale must be finite and > 0"),
    ("matryoshka_infonce", (Q, C, torch.randn(3, 1, 5, 8), LABELS, [1], [1], 1.0, None, None, None), ValueError,
     "hard_negatives must have shape"),
    ("matryoshka_infonce_backward", (torch.ones(2, 3), torch.ones(2, 3), Q, C, HN0, LABELS, [1], [1], 1.0, None,
                                     None, None, [True] * 3), ValueError, r"grad must have shape \(G, Nq\)"),
]


@pytest.mark.parametrize("backend", op_backends())
@pytest.mark.parametrize("op,args,error,match", OP_CASES, ids=[f"{c[0]}-{c[3][:24]}" for c in OP_CASES])
def test_direct_op_calls_are_checked_on_every_backend(backend, op, args, error, match):
    with pytest.raises(error, match=match):
        ops_of(backend)(op)(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_labels_need_as_many_candidates_as_queries(backend):
    """labels default to arange(Nq): with Nc < Nq that is out of range, a ValueError naming
    labels on every backend (it used to be a bare RuntimeError from gather, or nothing)."""
    with pytest.raises(ValueError, match=r"labels: the default labels arange\(Nq\).*Nq=3.*Nc=2"):
        matryoshka_infonce(Q, C[:2], backend=backend)
    with pytest.raises(ValueError, match=r"labels"):
        MatryoshkaInfoNCELoss(backend=backend, groups=None)(Q, C[:2])


@pytest.mark.parametrize("backend", op_backends())
def test_out_of_range_labels_raise_value_error_under_torch_compile(backend):
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(lambda q, c, labels: matryoshka_infonce(q, c, labels=labels, backend=backend),
                       fullgraph=True, backend="aot_eager")
    assert torch.isfinite(fn(Q, C, torch.tensor([4, 0, 1])))
    with pytest.raises(ValueError, match=r"labels must index the candidates c: need 0 <= labels < Nc=5"):
        fn(Q, C, torch.tensor([4, 0, 5]))


def test_loss_module_accepts_groups_none_like_the_functional_api():
    loss = MatryoshkaInfoNCELoss(groups=None)
    torch.testing.assert_close(loss(Q, C), matryoshka_infonce(Q, C, None))
    assert loss.groups is None
    with pytest.raises(ValueError, match=r"groups\[0\] = \(0, 1\) is out of range: need r_q >= 1"):
        MatryoshkaInfoNCELoss(groups=[(0, 1)])
    with pytest.raises(TypeError, match=r"groups must be a sequence"):
        MatryoshkaInfoNCELoss(groups=5)
    assert MatryoshkaInfoNCELoss().groups == DEFAULT_GROUPS


def test_unavailable_backends_raise_clearly(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: .*cuda tensors"):
        maxsim(Q, C, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        maxsim(Q, C, backend="triton")


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("METAEMBED_BACKEND", "reference")
    assert select_backend(None, torch.device("cpu"), torch.float32).name == "reference"
    assert select_backend("cpu" if "cpu" in BACKENDS else "reference", torch.device("cpu"), torch.float32).name in BACKENDS
    monkeypatch.setenv("METAEMBED_BACKEND", "cpuu")
    with pytest.raises(ValueError, match=r"METAEMBED_BACKEND environment variable must be one of .* got "
                                         r"METAEMBED_BACKEND='cpuu'"):
        maxsim(Q, C)
    monkeypatch.setenv("METAEMBED_BACKEND", "auto")
    expected = "cpu" if "cpu" in BACKENDS else "reference"
    assert select_backend(None, torch.device("cpu"), torch.float32).name == expected
    assert select_backend(None, torch.device("cpu"), torch.float64).name == expected  # cpu kernels run float64


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("METAEMBED_BACKEND", raising=False)
    assert select_backend(None, torch.device("cpu"), torch.float32).name in ("cpu", "reference")


def test_gather_across_ranks_without_process_group_is_local():
    loss = MatryoshkaInfoNCELoss(groups=((1, 1), (4, 6)), gather_across_ranks=True)
    local = MatryoshkaInfoNCELoss(groups=((1, 1), (4, 6)))
    assert torch.equal(loss(Q, C[:3]), local(Q, C[:3]))


def test_missing_extension_falls_back_to_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['metaembed_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, metaembed_kernels as mk\n"
        "msgs = [str(x.message) for x in w if 'C++ extension not available' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert mk.available_backends('cpu') == ('reference',)\n"
        "q, c = torch.randn(2, 3, 4), torch.randn(5, 6, 4)\n"
        "assert mk.select_backend(None, q.device, q.dtype).name == 'reference'\n"
        "print(mk.maxsim_grouped(q, c, [(1, 1), (3, 6)]).shape)\n"
    )
    # Without TRITON_INTERPRET (conftest sets it here): the interpreter would make "triton" a
    # CPU backend too, and this test is about the compiled extension's absence.
    env = {k: v for k, v in os.environ.items() if k not in ("METAEMBED_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 2, 5])" in out.stdout


def test_auto_picks_triton_for_large_budgets_and_skips_it_only_for_absurd_ones(monkeypatch):
    """Triton chunks any budget (ColBERT documents, ColPali pages, long queries), so
    selection with the groups known picks it for CUDA tensors; only budgets past its int32
    token indices (>= 2^30 tokens) are refused: auto moves on, an explicit request fails."""
    pytest.importorskip("triton")
    from metaembed_kernels.backends import get_backend

    monkeypatch.delenv("METAEMBED_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = get_backend("triton")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    large = ((16, 64), (32, 1030), (96, 300), (1, 5000))
    max_rq, max_rc = max(g[0] for g in large), max(g[1] for g in large)
    assert triton.unavailable_reason("cpu", torch.float32, max_rq, max_rc) is None
    assert select_backend(None, cuda, torch.bfloat16, large).name == "triton"
    absurd = ((1, 2**30),)
    assert "2^30" in triton.unavailable_reason("cuda", torch.bfloat16, 1, 2**30)
    assert select_backend(None, cuda, torch.bfloat16, absurd).name != "triton"
    with pytest.raises(BackendUnavailableError, match="2\\^30"):
        select_backend("triton", cuda, torch.bfloat16, absurd)
    # a budget past the old single-tile limit (r_q <= 64) runs
    q, c = torch.randn(2, 65, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(maxsim_grouped(q, c, backend="triton"), maxsim_grouped(q, c, backend="reference"))
