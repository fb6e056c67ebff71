"""Every installed peer computes the reference grouped MaxSim (plain asserts, not benchmarks).

    pytest benchmarks/test_peers_agree.py

(`pytest benchmarks --benchmark-only` skips these.) Peers that are not installed are
skipped; native peers run in a subprocess, so a crash fails a test instead of the session.
"""
import importlib.util
import os
import sys
from importlib import metadata

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import workloads  # noqa: E402  (before peers: workloads imports peers at its end)
import peers  # noqa: E402
from metaembed_kernels import DEFAULT_GROUPS  # noqa: E402

MODULES = {"pylate": "pylate", "colpali": "colpali_engine", **peers.NATIVE}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# small shapes with the token counts and widths of the real workloads
CASES = {
    "grouped-D128": workloads.Workload("grouped-D128", 3, 16, 7, 64, 128, DEFAULT_GROUPS),
    "full-D128": workloads.Workload("full-D128", 2, 32, 5, 128, 128, ((32, 128),)),
    "grouped-D3584": workloads.Workload("grouped-D3584", 2, 16, 3, 64, 3584, DEFAULT_GROUPS),
}


def _installed(peer):
    if importlib.util.find_spec(MODULES[peer]) is None:
        pytest.skip(f"{peer} is not installed")


def _known_broken(peer, w):
    """maxsim-cpu 0.1.0 segfaults or returns garbage above D=256 (measured here)."""
    return peer == "maxsim-cpu" and metadata.version("maxsim-cpu") == "0.1.0" and w.d > 256


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("peer", list(peers.PEER_PROVIDERS))
def test_peer_matches_reference(peer, case, dtype):
    _installed(peer)
    w, dt = CASES[case], DTYPES[dtype]
    if peer in peers.NATIVE and dt != torch.float32:
        with pytest.raises(workloads.Unavailable, match="does not take bfloat16"):
            peers.PEER_PROVIDERS[peer](w, dt, workloads.make_inputs(w, dt))
        return
    # the probe the benchmarks use (subprocess for native peers), on its structured inputs
    verdict = peers.probe_subprocess(peer, w, dt) if peer in peers.NATIVE else peers.verify(peer, w, dt)
    if _known_broken(peer, w):
        assert verdict is not None, "the probe must catch maxsim-cpu 0.1.0 at this D"
        pytest.xfail(verdict)
    assert verdict is None, verdict
    # and the provider the benchmarks time, in this process, on the benchmarks' random inputs
    x = workloads.make_inputs(w, dt, seed=1)
    out = workloads.PROVIDERS[peer](w, dt, x)()
    assert peers.check_against_reference(out, w, x, dt) is None


def test_probe_reports_a_crash():
    """A probe child that dies is reported as 'probe crashed' (and this process survives)."""
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    reason = peers.run_probe_command(crash, "fake at D=1")
    assert reason == "probe crashed: fake at D=1 died with SIGSEGV", reason
    assert peers.run_probe_command([sys.executable, "-c", "pass"], "fake") is None


def test_wrong_groups_are_caught():
    """The agreement check rejects full MaxSim returned for every group."""
    from metaembed_kernels import reference

    w = CASES["grouped-D128"]
    x = peers.probe_inputs(w, torch.float32)
    full = reference.maxsim_grouped(x["q"], x["c"], [(w.rq, w.rc)])
    wrong = full.expand(len(w.groups), -1, -1)
    assert peers.check_against_reference(wrong, w, x, torch.float32) is not None
    right = reference.maxsim_grouped(x["q"], x["c"], w.groups)
    assert peers.check_against_reference(right, w, x, torch.float32) is None


def test_small_workload_keeps_the_shape_that_matters():
    w = workloads.WORKLOADS["W4"]
    ws = peers.small_workload(w)
    assert (ws.rq, ws.rc, ws.d, ws.groups) == (w.rq, w.rc, w.d, w.groups)
    assert (ws.nq, ws.nc) == (2, 3)


def test_peers_are_registered_and_torch_is_still_cpu():
    assert set(peers.PEER_PROVIDERS) <= set(workloads.PROVIDERS)
    assert torch.__version__.startswith("2.13.0"), torch.__version__
