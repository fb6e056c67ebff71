"""Peer MaxSim libraries as benchmark providers (merged into workloads.PROVIDERS).

Each provider is ``factory(w, dtype, x) -> zero-arg callable`` returning the grouped scores
(G, Nq, Nc) for the inputs ``x`` ("q" (Nq, Rq, D), "c" (Nc, Rc, D)), or raises
``workloads.Unavailable``. The peers only compute full MaxSim, so a workload with several
(r_q, r_c) groups calls the peer once per group on the prefix slices q[:, :r_q], c[:, :r_c],
as a user of that library would compute the budgets.

Each peer is used the way its documentation shows for CPU:

* ``pylate``: ``pylate.scores.colbert_scores(q, c)`` on torch tensors (any float dtype; on
  CPU its default ``backend="auto"`` is the torch einsum path).
* ``colpali``: ``ColPaliProcessor.score_multi_vector(qs, ps, device="cpu")`` (a static
  method: no model is needed), a padded tensor for qs and ps, default ``batch_size=128``.
* ``maxsim-cpu``, ``maxsim-fast``, ``fast-maxsim``: ``maxsim_scores(query, docs)`` with one
  query ``[Lq, D]`` and documents ``[N, Ld, D]``, C-contiguous numpy float32 only (they
  reject other dtypes and non-contiguous arrays), one call per query. The document prefixes
  are copied to contiguous float32 arrays once, outside the timed callable (an index can keep
  them; this favours the peer); the query's torch -> numpy conversion is inside it.

Native peers are probed in a subprocess, once per (peer, D, dtype) and session, by running
the provider's own callable on tiny inputs with the workload's D, groups and dtype (so a
segfault cannot take the benchmark session down: maxsim-cpu 0.1.0 dies at large D), and
every peer's output is compared there with ``metaembed_kernels.reference.maxsim_grouped``
(Python peers in-process), so a peer that computes something else is never timed.

This module imports ``workloads`` only inside functions: ``workloads`` imports this module
at its end, and a top-level import here would break when ``peers`` is imported first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Callable, Dict, Optional, Tuple

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
NATIVE = {"maxsim-cpu": "maxsim_cpu", "maxsim-fast": "maxsim_fast", "fast-maxsim": "fast_maxsim"}
PROBE_TIMEOUT_S = 300
_WRONG_RESULT_EXIT = 3

# (peer, D, dtype name) -> None when the peer ran and agreed with the reference, else why not
_VERDICTS: Dict[Tuple[str, int, str], Optional[str]] = {}


def _unavailable(reason: str) -> Exception:
    from workloads import Unavailable

    return Unavailable(reason)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _prefix_pairs(w, x):
    """Per group, the prefix views q[:, :r_q], c[:, :r_c] (views: no copy)."""
    return [(x["q"][:, :r_q], x["c"][:, :r_c]) for r_q, r_c in w.groups]


# ---- builders: (w, dtype, x) -> callable, no probing -------------------------------------

def _build_pylate(w, dtype, x):
    try:
        from pylate.scores import colbert_scores
    except Exception as err:  # not installed, or a dependency that does not import here
        raise _unavailable(f"pylate not importable: {type(err).__name__}: {err}") from None
    pairs = _prefix_pairs(w, x)
    return lambda: torch.stack([colbert_scores(q, c) for q, c in pairs])


def _build_colpali(w, dtype, x):
    try:
        from colpali_engine.models import ColPaliProcessor
    except Exception as err:
        raise _unavailable(f"colpali-engine not importable: {type(err).__name__}: {err}") from None
    score = ColPaliProcessor.score_multi_vector
    pairs = _prefix_pairs(w, x)
    return lambda: torch.stack([score(q, c, device="cpu") for q, c in pairs])


def _import_native(peer: str):
    import importlib

    try:
        return importlib.import_module(NATIVE[peer])
    except Exception as err:
        raise _unavailable(f"{peer} not importable: {type(err).__name__}: {err}") from None


def _build_native(peer: str):
    def build(w, dtype, x):
        mod = _import_native(peer)
        if dtype != torch.float32:
            raise _unavailable(f"{peer} does not take {_dtype_name(dtype)} (numpy float32 only)")
        import numpy as np

        q, c = x["q"], x["c"]
        # reusable document arrays, one per distinct r_c, contiguous float32 (no copy at full Rc)
        docs = {r_c: np.ascontiguousarray(c[:, :r_c].numpy(), dtype=np.float32) for _, r_c in w.groups}
        groups = list(w.groups)
        nq, nc = q.shape[0], c.shape[0]
        maxsim_scores = mod.maxsim_scores

        def run():
            qn = q.numpy()  # per call: the query arrives as a torch tensor
            out = np.empty((len(groups), nq, nc), dtype=np.float32)
            for g, (r_q, r_c) in enumerate(groups):
                d = docs[r_c]
                for a in range(nq):
                    out[g, a] = maxsim_scores(np.ascontiguousarray(qn[a, :r_q], dtype=np.float32), d)
            return torch.from_numpy(out)

        return run

    return build


BUILDERS: Dict[str, Callable] = {
    "pylate": _build_pylate,
    "colpali": _build_colpali,
    **{peer: _build_native(peer) for peer in NATIVE},
}


# ---- verification against the reference, and the subprocess probe -----------------------

def probe_inputs(w, dtype: torch.dtype, seed: int = 0) -> dict:
    """Tiny inputs shaped like ``w`` in which the groups differ clearly.

    Every candidate token is a noisy copy of some query token (cosine ~0.8), so which tokens
    fall inside each prefix decides the scores: a peer that mixed up the groups, dropped
    tokens or computed anything but sum-of-max would not pass the tolerance.
    """
    gen = torch.Generator().manual_seed(seed)

    def normalize(t):
        return torch.nn.functional.normalize(t, dim=-1)

    q = normalize(torch.randn(w.nq, w.rq, w.d, generator=gen))
    pick = torch.randint(0, w.nq * w.rq, (w.nc, w.rc), generator=gen)
    noise = normalize(torch.randn(w.nc, w.rc, w.d, generator=gen))
    c = normalize(q.reshape(-1, w.d)[pick] + 0.75 * noise)
    return {"q": q.to(dtype), "c": c.to(dtype)}


def check_against_reference(out: torch.Tensor, w, x: dict, dtype: torch.dtype) -> Optional[str]:
    """None when ``out`` matches the reference grouped scores, else a description."""
    from metaembed_kernels import reference

    ref = reference.maxsim_grouped(x["q"], x["c"], w.groups).double()
    if tuple(out.shape) != tuple(ref.shape):
        return f"wrong result: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    out = out.double()
    # fp32: accumulation-order noise; bf16 peers round the similarities and scores to bf16
    rtol = 1e-4 if dtype == torch.float32 else 2.0 ** -7
    err = (out - ref).abs()
    bad = err > 1e-3 + rtol * ref.abs()
    if bool(bad.any()) or not bool(torch.isfinite(out).all()):
        return (f"wrong result vs reference: max abs err {err.max().item():.3g} "
                f"(scores up to {ref.abs().max().item():.3g}, {int(bad.sum())}/{bad.numel()} off)")
    return None


def small_workload(w, nq: int = 2, nc: int = 3):
    """``w`` with tiny Nq, Nc: the same D, groups and token counts."""
    return dataclasses.replace(w, nq=nq, nc=nc, kind="maxsim", hard_negatives=0)


def verify(peer: str, w, dtype: torch.dtype) -> Optional[str]:
    """Run the peer on tiny inputs shaped like ``w`` (same D, groups, dtype), in this process."""
    ws = small_workload(w)
    x = probe_inputs(ws, dtype)
    try:
        fn = BUILDERS[peer](ws, dtype, x)
        out = fn()
    except Exception as err:
        from workloads import Unavailable

        if isinstance(err, Unavailable):
            return str(err)
        return f"failed on a small input: {type(err).__name__}: {err}"
    return check_against_reference(out, ws, x, dtype)


def _probe_main(peer: str, spec: str) -> int:
    """Entry point of the probe subprocess: exit 0 if the peer agreed with the reference."""
    import workloads  # noqa: F401  (first, so that its `from peers import ...` sees this module)

    fields = json.loads(spec)
    fields["groups"] = tuple(tuple(g) for g in fields["groups"])
    dtype = getattr(torch, fields.pop("dtype"))
    w = workloads.Workload(**fields)
    verdict = verify(peer, w, dtype)
    if verdict:
        print(verdict)
        return _WRONG_RESULT_EXIT
    print("ok")
    return 0


def probe_subprocess(peer: str, w, dtype: torch.dtype) -> Optional[str]:
    """Run ``verify`` in a fresh interpreter; None if it passed, else the reason."""
    spec = json.dumps(dict(name=w.name, nq=w.nq, rq=w.rq, nc=w.nc, rc=w.rc, d=w.d,
                           groups=[list(g) for g in w.groups], dtype=_dtype_name(dtype)))
    code = (f"import sys; sys.path.insert(0, {BENCH_DIR!r}); import workloads, peers; "
            f"sys.exit(peers._probe_main({peer!r}, {spec!r}))")
    where = f"{peer} at D={w.d} {_dtype_name(dtype)}"
    return run_probe_command([sys.executable, "-c", code], where)


def run_probe_command(cmd, where: str) -> Optional[str]:
    """Run a probe command; None if it exited 0, else why (crash, timeout, wrong result)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"probe crashed: {where} did not finish in {PROBE_TIMEOUT_S} s"
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        return None
    if proc.returncode == _WRONG_RESULT_EXIT:
        return f"{where}: {last}"
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return f"probe crashed: {where} died with {sig}"
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return f"probe crashed: {where} exited with {proc.returncode}: {tail[-300:]}"


def verdict(peer: str, w, dtype: torch.dtype) -> Optional[str]:
    """Cached per (peer, D, dtype) for the session: None if the peer may be timed."""
    key = (peer, w.d, _dtype_name(dtype))
    if key not in _VERDICTS:
        _VERDICTS[key] = probe_subprocess(peer, w, dtype) if peer in NATIVE else verify(peer, w, dtype)
    return _VERDICTS[key]


# ---- providers ---------------------------------------------------------------------------

def _provider(peer: str):
    def factory(w, dtype, x):
        if w.kind != "maxsim":
            raise _unavailable("maxsim-only peer")
        if peer in NATIVE:  # cheap refusals first, without a subprocess
            _import_native(peer)
            if dtype != torch.float32:
                raise _unavailable(f"{peer} does not take {_dtype_name(dtype)} (numpy float32 only)")
        reason = verdict(peer, w, dtype)
        if reason:
            raise _unavailable(reason)
        return BUILDERS[peer](w, dtype, x)

    factory.__name__ = f"peer_{peer.replace('-', '_')}"
    return factory


PEER_PROVIDERS: Dict[str, Callable] = {peer: _provider(peer) for peer in BUILDERS}
