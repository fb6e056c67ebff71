"""GPU field check: build, ceilings, correctness and speed of the GPU kernels, then a verdict.

    scripts/gpu_check.sh [--dry-run] [--out DIR] [--set NAME=VALUE ...]   (make gpu-check)

Run through scripts/gpu_check.sh, which skips with "no CUDA device: skipped" where torch
sees no GPU. Stages, each timed; a stage that cannot run stops the check with its reason:

  1. environment  GPU, SMs, driver, CUDA, torch, triton, nvcc.
  2. build        the extension with METAEMBED_BUILD_CUDA=1 against the installed torch,
                  for the local architecture only, MAX_JOBS = all cores, out of tree
                  (--build-dir), so neither the clone nor the environment changes.
  3. ceilings     device-to-device copy bandwidth; bf16 and fp32 torch.matmul on random data.
  4. correctness  a quick parity check of every GPU backend against the float64 reference
                  (forward, gradients, fused loss); `pytest -m gpu` (tests/test_triton.py,
                  tests/test_cuda.py: the awkward-shape sweep, three dtypes;
                  tests/test_index_gpu.py: the index on CUDA tensors against the CPU index).
  5. speed        triton.testing.do_bench medians (warm-up, fresh random inputs, rotating
                  input sets where they would fit in L2) of triton and cuda against the
                  einsum reference: the paper's retrieval setting (1 and 64 queries), the five
                  default budgets in one call against five calls, the index's search on
                  the device (against scoring + torch.topk), the fused loss step.
  6. sanitizer    compute-sanitizer memcheck and racecheck on a small cuda-backend case,
                  when the tool exists (last: the slowest stage, so a check cut short by
                  its slot keeps the speed results; a timed-out tool is a row, not a stop).
  7. verdict      a short table last; everything as JSON (gpu_check.json) next to the log
                  (gpu_check.log, written by the shell wrapper) under --out.

--dry-run runs every Python stage on CPU at tiny sizes: the triton backend under
TRITON_INTERPRET=1 stands in for the GPU triton backend, the cpu backend for cuda, a
perf_counter median for do_bench; the build stage only prints its plan, and pytest only
collects the `gpu` tests (they skip without a GPU). tests/test_gpu_check.py runs it.

Every size lives in `Sizes` below (FULL on a GPU, DRY for the dry run); turn any down with
--set, e.g. `--set index_nc=20000 --set loss_nq=256` on a GPU with less memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# Sizes: the one place to turn the check down
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sizes:
    copy_mib: int = 4096  # device-to-device copy (read + write) for the bandwidth ceiling
    matmul_n: int = 8192  # n x n x n torch.matmul for the bf16 / fp32 rates
    rq: int = 16  # paper setting: query / candidate vectors
    rc: int = 64
    d: int = 3584  # MetaEmbed-7B width
    index_nc: int = 100_000  # paper index: 100k candidates (45.9 GB of bf16)
    batch_nq: int = 64  # queries of the compute-bound retrieval case
    groups_nq: int = 16  # queries of the five-budgets case (same index)
    search_n: int = 200_000  # MultiVectorIndex on the device: issue 12's synthetic setting
    search_d: int = 128
    loss_nq: int = 512  # fused loss step: queries = in-batch candidates
    loss_hn: int = 1  # hard negatives per query
    reference_chunk: int = 10_000  # candidates per reference einsum (it upcasts to fp32)
    parity_d: int = 200  # quick parity check (correctness stage)
    parity_cases: int = 6  # (dtype, shape) cases per backend: 6 = 3 dtypes x 2 shapes
    warmup_ms: int = 25  # do_bench
    rep_ms: int = 100
    parity_timeout_s: int = 300
    pytest_timeout_s: int = 300
    speed_timeout_s: int = 420
    sanitizer_timeout_s: int = 180


FULL = Sizes()
DRY = Sizes(copy_mib=4, matmul_n=64, rq=16, rc=64, d=16, index_nc=6, batch_nq=2, groups_nq=1, search_n=40,
            search_d=16, loss_nq=2, loss_hn=1, reference_chunk=4, parity_d=16, parity_cases=3, warmup_ms=0, rep_ms=0,
            parity_timeout_s=300, pytest_timeout_s=300, speed_timeout_s=300, sanitizer_timeout_s=120)


def parse_sets(base: Sizes, sets: List[str]) -> Sizes:
    fields = {f.name: f for f in dataclasses.fields(Sizes)}
    values = {}
    for item in sets:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        values[name] = int(value)
    return dataclasses.replace(base, **values)


# ---------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------
class StageError(Exception):
    """A stage could not run; the message says why (the check stops there)."""


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run_cmd(cmd: List[str], *, env=None, cwd=None, timeout=None, echo_tail: int = 0) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as err:
        raise StageError(f"{' '.join(cmd[:4])} ... timed out after {timeout} s") from err
    if echo_tail:
        out = (result.stdout + result.stderr).strip().splitlines()
        for line in out[-echo_tail:]:
            log("   " + line)
    return result


class Check:
    def __init__(self, args, sizes: Sizes):
        self.args = args
        self.dry = args.dry_run
        self.sizes = sizes
        self.out = os.path.abspath(args.out)
        self.results: Dict = dict(dry_run=self.dry, sizes=dataclasses.asdict(sizes), stages={}, started=time.time())
        self.t0 = time.perf_counter()
        self.pkg_dir = REPO  # where metaembed_kernels is imported from (the build's copy on a GPU)

    # -- plumbing --------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], Dict]) -> Dict:
        log(f"== gpu-check [{time.perf_counter() - self.t0:5.0f}s] {name}")
        start = time.perf_counter()
        record = dict(status="ok")
        try:
            record.update(fn() or {})
        except StageError as err:
            record.update(status="stopped", reason=str(err))
        except Exception as err:  # a bug in a stage is a failed stage, with its traceback in the log
            traceback.print_exc()
            record.update(status="error", reason=f"{type(err).__name__}: {err}")
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.results["stages"][name] = record
        if record["status"] != "ok":
            log(f"   {name}: {record['status'].upper()}: {record.get('reason', '')}")
        else:
            log(f"   {name}: ok ({record['seconds']} s)")
        self.save()
        return record

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(self.results, f, indent=2, default=str)

    def child(self, stage: str, timeout: int) -> Dict:
        """Run a measuring stage in a fresh interpreter that imports the built package."""
        result_path = os.path.join(self.out, f".{stage}.json")
        if os.path.exists(result_path):
            os.remove(result_path)
        env = dict(os.environ, PYTHONPATH=self.pkg_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", stage, "--child-result", result_path,
               "--out", self.out] + (["--dry-run"] if self.dry else [])
        cmd += [f"--set={k}={v}" for k, v in dataclasses.asdict(self.sizes).items()]
        try:
            proc = subprocess.run(cmd, env=env, cwd=self.pkg_dir, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise StageError(f"stage {stage} timed out after {timeout} s (turn sizes down with --set)") from err
        if not os.path.exists(result_path):
            raise StageError(f"stage {stage} exited with {proc.returncode} before writing its results")
        with open(result_path) as f:
            data = json.load(f)
        os.remove(result_path)
        if data.get("status") not in (None, "ok"):
            raise StageError(data.get("reason", f"stage {stage} failed"))
        return data

    # -- stages ----------------------------------------------------------------------
    def environment(self) -> Dict:
        import torch

        info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cores=nproc())
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
        info["nvcc_path"] = nvcc
        if nvcc and os.path.exists(nvcc):
            text = run_cmd([nvcc, "--version"]).stdout
            found = re.search(r"release ([\d.]+)", text)
            info["nvcc"] = found.group(1) if found else text.strip().splitlines()[-1:]
        else:
            info["nvcc"] = None
        if self.dry:
            info.update(gpu="(dry run: CPU)", sms=0, capability=None, driver=None)
        else:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1),
                        l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
            smi = shutil.which("nvidia-smi")
            info["driver"] = (run_cmd([smi, "--query-gpu=driver_version", "--format=csv,noheader"]).stdout.strip()
                              if smi else None)
        for k, v in info.items():
            log(f"   {k:12} {v}")
        if not self.dry:
            if info["torch_cuda"] is None:
                raise StageError(f"torch {info['torch']} is not a CUDA build")
            if not info["nvcc"]:
                raise StageError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
            if info["triton"] is None:
                raise StageError("triton is not installed (pip install triton matching your torch)")
        self.results["environment"] = info
        return {}

    def build_plan(self) -> Dict:
        import torch

        if self.dry:
            arch = "9.0a"  # what an H100/H200 would get
        else:
            major, minor = torch.cuda.get_device_capability(0)
            arch = f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")  # wgmma needs sm_90a
        env = dict(METAEMBED_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(nproc()))
        return dict(env=env, dir=os.path.abspath(self.args.build_dir),
                    command=[sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", "../temp"])

    def build(self) -> Dict:
        plan = self.build_plan()
        log(f"   {' '.join(f'{k}={v}' for k, v in plan['env'].items())} {' '.join(plan['command'][1:])}")
        log(f"   in {plan['dir']}/src")
        if self.dry:
            log("   dry run: not compiling; the stages below import the extension already built in this clone")
            return dict(plan=plan, built=False)
        src = os.path.join(plan["dir"], "src")
        sync_sources(REPO, src)
        env = dict(os.environ, **plan["env"])
        start = time.perf_counter()
        proc = run_cmd(plan["command"], env=env, cwd=src)
        with open(os.path.join(self.out, "build.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
            for line in errors[:20] or (proc.stdout + proc.stderr).splitlines()[-20:]:
                log("   " + line)
            raise StageError(f"build failed (full log: {self.out}/build.log)")
        self.pkg_dir = src
        check = run_cmd([sys.executable, "-c",
                         "import metaembed_kernels as m; e = m._extension; "
                         "assert e.is_loaded(), e.load_error(); assert e._C.built_with_cuda(), 'built without CUDA'; "
                         "assert e.has_kernel('cuda'), 'CUDA kernels missing'; print('extension ok, cpu isa', e.cpu_isa())"],
                        cwd=src, echo_tail=3)
        if check.returncode != 0:
            raise StageError("the built extension does not load with its CUDA kernels")
        return dict(plan=plan, built=True, compile_seconds=round(time.perf_counter() - start, 1))

    def correctness(self) -> Dict:
        data = self.child("parity", timeout=self.sizes.parity_timeout_s)
        record = dict(parity=data["parity"])
        failed = [r for r in data["parity"] if not r["ok"]]
        # pytest -m gpu: on a GPU it runs them; the dry run checks the selection is not empty
        files = ["tests/test_triton.py", "tests/test_cuda.py", "tests/test_index_gpu.py"]
        # --run-slow: the GPU tests marked slow (> 2^31-element inputs) take seconds on a GPU
        cmd = [sys.executable, "-m", "pytest", *files, "-m", "gpu", "--run-slow", "-q", "-p", "no:cacheprovider",
               "-rfE", "--durations=10"]
        if self.dry:
            cmd.append("--collect-only")
        env = dict(os.environ, PYTHONPATH=self.pkg_dir, PYTHONUNBUFFERED="1", METAEMBED_REPORT_FAILURES_AT_ONCE="1")
        if not self.dry:
            env.pop("TRITON_INTERPRET", None)
        log("   " + " ".join(cmd[1:]))
        # Written as it runs, so a run cut short by its timeout still leaves what it printed;
        # a timeout is a failed row, not a stop: the speed stage still runs.
        log_path = os.path.join(self.out, "pytest_gpu.log")
        with open(log_path, "w") as f:
            try:
                returncode = subprocess.run(cmd, env=env, cwd=self.pkg_dir, stdout=f, stderr=subprocess.STDOUT,
                                            timeout=self.sizes.pytest_timeout_s).returncode
            except subprocess.TimeoutExpired:
                returncode = None
        with open(log_path) as f:
            text = f.read()
        for line in text.strip().splitlines()[-8:]:
            log("   " + line)
        summary = (text.strip().splitlines() or [""])[-1]
        if returncode is None:
            summary = f"timed out after {self.sizes.pytest_timeout_s} s (partial log: {log_path})"
        record["pytest"] = dict(returncode=returncode, summary=summary)
        if self.dry:
            collected = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", text)
            n = int(collected.group(1)) if collected else 0
            record["pytest"]["collected"] = n
            if returncode != 0 or n == 0:
                failed.append("pytest -m gpu selects no test")
        elif returncode != 0:
            failed.append(f"pytest -m gpu: {summary}")
        record["failed"] = failed
        if failed:
            record["status"] = "failed"
            record["reason"] = "; ".join(str(f) for f in failed)[:500]
        return record

    def sanitizer(self) -> Dict:
        record = dict(tools=self.sanitize())
        failed = [f"compute-sanitizer {t}: {r['summary']}" for t, r in record["tools"].items() if r["status"] == "failed"]
        if failed:
            record.update(status="failed", reason="; ".join(failed)[:500])
        return record

    def sanitize(self) -> Dict:
        tool = shutil.which("compute-sanitizer")
        if tool is None:
            from torch.utils.cpp_extension import CUDA_HOME

            candidate = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "compute-sanitizer")
            tool = candidate if os.path.exists(candidate) else None
        out = {}
        case = [sys.executable, os.path.abspath(__file__), "--child", "sanitize-case", "--out", self.out] + (
            ["--dry-run"] if self.dry else [])
        env = dict(os.environ, PYTHONPATH=self.pkg_dir, PYTHONUNBUFFERED="1")
        if tool is None or self.dry:
            # the case itself still runs (once), so that it cannot rot
            proc = run_cmd(case, env=env, cwd=self.pkg_dir, timeout=self.sizes.sanitizer_timeout_s)
            ok = proc.returncode == 0
            why = "compute-sanitizer not found" if tool is None else "dry run"
            for kind in ("memcheck", "racecheck"):
                out[kind] = dict(status="skipped" if ok else "failed",
                                 summary=f"{why}; the case ran without it" if ok else (proc.stdout + proc.stderr)[-300:])
                log(f"   compute-sanitizer --tool {kind}: {out[kind]['summary']}")
            return out
        for kind in ("memcheck", "racecheck"):
            cmd = [tool, "--tool", kind, "--target-processes", "all", "--error-exitcode", "86"]
            if kind == "memcheck":
                cmd += ["--leak-check", "no"]
            try:
                proc = run_cmd(cmd + case, env=env, cwd=self.pkg_dir, timeout=self.sizes.sanitizer_timeout_s)
            except StageError as err:  # too slow for the slot: say so, the other tool still runs
                out[kind] = dict(status="timed out", summary=str(err))
                log(f"   compute-sanitizer --tool {kind}: {out[kind]['summary']}")
                continue
            text = proc.stdout + proc.stderr
            with open(os.path.join(self.out, f"sanitizer_{kind}.log"), "w") as f:
                f.write(text)
            summary = next((line.strip() for line in text.splitlines()[::-1] if "SUMMARY" in line), "")
            if proc.returncode == 86 or re.search(r"SUMMARY: [1-9]", summary):
                status = "failed"
            elif proc.returncode == 0:
                status = "ok"
            else:  # the tool itself could not run here (e.g. "Device not supported")
                status = "unavailable"
                summary = summary or text.strip().splitlines()[-1:][0] if text.strip() else f"exit {proc.returncode}"
            out[kind] = dict(status=status, summary=summary or f"exit {proc.returncode}")
            log(f"   compute-sanitizer --tool {kind}: {status}: {out[kind]['summary']}")
        return out

    # -- main ------------------------------------------------------------------------
    def run(self) -> int:
        log(f"gpu-check{' (dry run)' if self.dry else ''}: results under {self.out}")
        order = [("environment", self.environment), ("build", self.build),
                 ("ceilings", lambda: self.child("ceilings", timeout=300)),
                 ("correctness", self.correctness),
                 ("speed", lambda: self.child("speed", timeout=self.sizes.speed_timeout_s)),
                 ("sanitizer", self.sanitizer)]
        for name, fn in order:
            record = self.stage(name, fn)
            if name == "ceilings" and record["status"] == "ok":
                self.results["ceilings"] = record
            if record["status"] in ("stopped", "error") or (name in ("environment", "build")
                                                            and record["status"] != "ok"):
                log(f"gpu-check stopped at stage '{name}': {record.get('reason')}")
                break
        self.results["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        log(verdict_table(self.results))
        bad = [n for n, r in self.results["stages"].items() if r["status"] != "ok"]
        return 1 if bad else 0


def nproc() -> int:
    """Cores this process may use (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sync_sources(repo: str, dst: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sync_sources import sync

    log(f"   {sync(repo, dst)} source file(s) changed since the last build there")


# ---------------------------------------------------------------------------------------
# Measuring stages (run in a child interpreter, inside the built package's directory)
# ---------------------------------------------------------------------------------------
class Device:
    """The GPU, or in a dry run the CPU with stand-ins for each GPU backend."""

    def __init__(self, dry: bool, sizes: Sizes):
        import torch

        self.dry, self.sizes = dry, sizes
        self.device = torch.device("cpu" if dry else "cuda")
        # backend under test -> backend that runs it here
        self.backends = {"triton": "triton", "cuda": "cpu" if dry else "cuda"}
        self.l2_bytes = 0 if dry else getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)

    def sync(self):
        import torch

        if not self.dry:
            torch.cuda.synchronize()

    def bench(self, fn: Callable[[], object]) -> float:
        """Median seconds of fn: triton.testing.do_bench on a GPU (which also clears the L2
        between calls); in a dry run one call after one warm-up (the numbers mean nothing)."""
        if self.dry:
            fn()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        from triton.testing import do_bench

        try:
            ms = do_bench(fn, warmup=self.sizes.warmup_ms, rep=self.sizes.rep_ms, return_mode="median")
        except TypeError:  # older triton: quantiles only
            ms = do_bench(fn, warmup=self.sizes.warmup_ms, rep=self.sizes.rep_ms, quantiles=[0.5])
        return float(ms[0] if isinstance(ms, (list, tuple)) else ms) * 1e-3

    def rotating(self, make: Callable[[int], dict], nbytes: int) -> Callable[[], dict]:
        """Input sets to cycle through, enough that their total is >= 2x the L2 (so the L2
        cannot serve a repeat), at most 8; each from its own seed (fresh random data)."""
        n = 1 if self.l2_bytes == 0 or nbytes >= 2 * self.l2_bytes else min(8, math.ceil(2 * self.l2_bytes / nbytes))
        sets = [make(seed) for seed in range(n)]
        state = {"i": 0}

        def next_set():
            state["i"] = (state["i"] + 1) % n
            return sets[state["i"]]

        return next_set


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (never rounds a small dry-run rate to 0)."""
    return float(f"{x:.{digits}g}")


def unit_tokens(shape, dtype, device, seed):
    """L2-normalised random tokens (never zeros), generated on the device in slices of at
    most ~1 GB of fp32 (the paper index is 45.9 GB of bf16: an fp32 copy would not fit)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(1000 + seed)
    out = torch.empty(*shape, dtype=dtype, device=device)
    per_item = max(1, math.prod(shape[1:]))
    step = max(1, (1 << 28) // per_item)
    for i in range(0, shape[0], step):
        part = torch.randn(min(step, shape[0] - i), *shape[1:], generator=gen, device=device)
        out[i:i + step] = (part / part.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(dtype)
    return out


def stage_ceilings(dev: Device, sizes: Sizes) -> Dict:
    import torch

    n_bytes = sizes.copy_mib << 20
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    t = dev.bench(lambda: dst.copy_(src))
    copy_gbs = 2 * n_bytes / t / 1e9  # bytes read + written
    del src, dst
    out = dict(copy_gb_per_s=float(f"{copy_gbs:.4g}"))
    log(f"   device-to-device copy, {sizes.copy_mib} MiB: {copy_gbs:.1f} GB/s (read + write)")
    n = sizes.matmul_n
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = unit_tokens((n, n), dtype, dev.device, 1)
        b = unit_tokens((n, n), dtype, dev.device, 2)
        t = dev.bench(lambda: torch.matmul(a, b))
        rate = 2 * n**3 / t / 1e12
        out[f"matmul_{name}_tflops"] = float(f"{rate:.4g}")
        log(f"   torch.matmul {name} {n}^3 on random data: {rate:.3f} TFLOP/s"
            + (" (fp32: tf32 off, torch's default)" if name == "fp32" and not dev.dry else ""))
        del a, b
    return out


def stage_parity(dev: Device, sizes: Sizes) -> Dict:
    """Every GPU backend against the float64 reference on two awkward shapes, three dtypes:
    scores, dq/dc, and the fused loss with hard negatives and masks (gradients included)."""
    import torch

    from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped, reference

    rows = []
    shapes = [(3, 5, 7, 9, sizes.parity_d + 1), (2, 16, 5, 64, sizes.parity_d)]  # Nq, Rq, Nc, Rc, D
    eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # dtype-major, shapes alternating, so that a smaller parity_cases still covers every dtype
    cases = [(dtypes[i % 3], shapes[(i // 3 + i) % 2]) for i in range(6)][: sizes.parity_cases]
    for backend, runs_as in dev.backends.items():
        for dtype, (nq, rq, nc, rc, d) in cases:
            if True:
                gen = torch.Generator().manual_seed(nq * 131 + rc)
                q = torch.randn(nq, rq, d, generator=gen).to(dtype)
                c = torch.randn(nc, rc, d, generator=gen).to(dtype)
                hn = torch.randn(nq, 2, rc, d, generator=gen).to(dtype)
                c_mask = torch.rand(nc, rc, generator=gen) > 0.3
                c_mask[0] = False  # an empty candidate
                groups = tuple(g for g in DEFAULT_GROUPS if g[0] <= rq and g[1] <= rc) + ((rq, rc),)
                grad = torch.randn(len(groups), nq, nc, generator=gen)
                # float64 reference on the same (rounded) inputs
                qr, cr, hr = (t.double().requires_grad_() for t in (q, c, hn))
                ref = reference.maxsim_grouped(qr, cr, groups, c_mask=c_mask)
                ref.backward(grad.double())
                ref_loss = reference.matryoshka_infonce(qr, cr, groups, hard_negatives=hr, c_mask=c_mask,
                                                        temperature=0.5)
                dq_ref, dc_ref = qr.grad.clone(), cr.grad.clone()
                qr.grad = cr.grad = None
                ref_loss.backward()
                # the backend on the device
                qk, ck, hk = (t.to(dev.device).requires_grad_() for t in (q, c, hn))
                mk = c_mask.to(dev.device)
                out = maxsim_grouped(qk, ck, groups, c_mask=mk, backend=runs_as)
                out.backward(grad.to(dev.device))
                dq, dc = qk.grad.cpu().double(), ck.grad.cpu().double()
                qk.grad = ck.grad = None
                loss = matryoshka_infonce(qk, ck, groups, hard_negatives=hk, c_mask=mk, temperature=0.5,
                                          backend=runs_as)
                loss.backward()
                # error in units of the inputs' rounding, relative to each quantity's scale
                u = eps[dtype]

                def err(got, want):
                    got, want = got.detach().cpu().double(), want.detach()
                    return float((got - want).abs().max() / (want.abs().max() + 1e-30))

                errs = dict(scores=err(out, ref), dq=err(dq, dq_ref), dc=err(dc, dc_ref),
                            loss=abs(float(loss) - float(ref_loss)) / (abs(float(ref_loss)) + 1e-30),
                            dq_loss=err(qk.grad, qr.grad), dc_loss=err(ck.grad, cr.grad),
                            dhn_loss=err(hk.grad, hr.grad))
                # bound: a few units of the input dtype's rounding of the output (the gradient
                # of a max is a gather of grad * token, rounded once), plus fp32 accumulation
                # over D (and over candidates for dq)
                bound = 8 * u + 4 * (d + nc * rc) * 2.0**-24
                ok = all(v <= bound for v in errs.values()) and all(math.isfinite(v) for v in errs.values())
                row = dict(backend=backend, runs_as=runs_as, dtype=str(dtype).replace("torch.", ""),
                           shape=[nq, rq, nc, rc, d], bound=bound, ok=ok,
                           **{k: float(f"{v:.3g}") for k, v in errs.items()})
                rows.append(row)
                worst = max(errs, key=errs.get)
                log(f"   {backend:6} ({runs_as}) {row['dtype']:8} {tuple(row['shape'])}: worst rel. error "
                    f"{errs[worst]:.2e} ({worst}) <= {bound:.1e}: {'ok' if ok else 'FAIL'}")
    return dict(parity=rows)


def stage_sanitize_case(dev: Device, sizes: Sizes) -> Dict:
    """The small cuda-backend case compute-sanitizer runs: forward, backward, fused loss."""
    import torch

    from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped

    backend = dev.backends["cuda"]
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(5, 16, 72, generator=gen).to(dtype).to(dev.device).requires_grad_()
        c = torch.randn(9, 64, 72, generator=gen).to(dtype).to(dev.device).requires_grad_()
        hn = torch.randn(5, 1, 64, 72, generator=gen).to(dtype).to(dev.device).requires_grad_()
        c_mask = (torch.rand(9, 64, generator=gen) > 0.2).to(dev.device)
        maxsim_grouped(q, c, DEFAULT_GROUPS, c_mask=c_mask, backend=backend).sum().backward()
        matryoshka_infonce(q, c, DEFAULT_GROUPS, hard_negatives=hn, c_mask=c_mask, backend=backend).backward()
        dev.sync()
    log("   sanitize case: forward, backward and fused loss ran")
    return {}


def stage_speed(dev: Device, sizes: Sizes, ceilings: Dict) -> Dict:
    import torch

    from metaembed_kernels import DEFAULT_GROUPS, matryoshka_infonce, maxsim_grouped, reference

    bf16 = torch.bfloat16
    rq, rc, d = sizes.rq, sizes.rc, sizes.d
    top = ((rq, rc),)
    rows = []
    item = 2

    # The index: generated once (45.9 GB at the full size; far beyond the L2, so one set).
    index_bytes = sizes.index_nc * rc * d * item
    c = unit_tokens((sizes.index_nc, rc, d), bf16, dev.device, 0)
    providers = dict(dev.backends)

    def reference_chunked(q, groups):
        # the reference upcasts to fp32 and materialises the similarity tensor: run it over
        # candidate chunks so it fits next to the index (same work, summed)
        chunk = sizes.reference_chunk
        return [reference.maxsim_grouped(q, c[b:b + chunk], groups) for b in range(0, sizes.index_nc, chunk)]

    def retrieval(case: str, nq: int):
        qsets = dev.rotating(lambda seed: unit_tokens((nq, rq, d), bf16, dev.device, 10 + seed), nq * rq * d * item)
        nbytes = index_bytes + nq * rq * d * item + nq * sizes.index_nc * 4
        flops = 2.0 * nq * sizes.index_nc * rq * rc * d
        times = {}
        for name, runs_as in providers.items():
            try:
                times[name] = dev.bench(lambda: maxsim_grouped(qsets(), c, top, backend=runs_as))
            except Exception as err:  # a backend that cannot run is a row, not a crash
                log(f"   {case} {name}: {type(err).__name__}: {err}")
        times["reference"] = dev.bench(lambda: reference_chunked(qsets(), top))
        for name, t in times.items():
            row = dict(case=case, provider=name, ms=sig(t * 1e3), gb_per_s=sig(nbytes / t / 1e9),
                       tflops=sig(flops / t / 1e12), x_reference=sig(times["reference"] / t))
            if nq == 1:  # memory-bound: the floor is reading everything at the measured copy rate
                row.update(roofline="copy bandwidth", fraction=sig(nbytes / t / 1e9 / ceilings["copy_gb_per_s"]))
            else:
                row.update(roofline="bf16 matmul", fraction=sig(flops / t / 1e12 / ceilings["matmul_bf16_tflops"]))
            rows.append(row)
            log(f"   {case:22} {name:9} {row['ms']:10.3f} ms  {row['gb_per_s']:8.1f} GB/s  {row['tflops']:8.3f} TFLOP/s"
                f"  {100 * row['fraction']:5.1f}% of {row['roofline']}  {row['x_reference']:6.2f}x reference")

    retrieval(f"paper 1q x {sizes.index_nc}", 1)
    retrieval(f"paper {sizes.batch_nq}q x {sizes.index_nc}", sizes.batch_nq)

    # The five default budgets: one call against five.
    qsets = dev.rotating(lambda seed: unit_tokens((sizes.groups_nq, rq, d), bf16, dev.device, 20 + seed),
                         sizes.groups_nq * rq * d * item)
    for name, runs_as in providers.items():
        try:
            one = dev.bench(lambda: maxsim_grouped(qsets(), c, DEFAULT_GROUPS, backend=runs_as))
            q = qsets()
            five = dev.bench(lambda: [maxsim_grouped(q, c, (g,), backend=runs_as) for g in DEFAULT_GROUPS])
        except Exception as err:  # a backend that cannot run is a line, not a crash
            log(f"   5 budgets {name}: {type(err).__name__}: {err}")
            continue
        rows.append(dict(case=f"5 budgets {sizes.groups_nq}q", provider=name, ms=sig(one * 1e3),
                         five_calls_ms=sig(five * 1e3), x_five_calls=sig(five / one)))
        log(f"   5 budgets, {sizes.groups_nq}q    {name:9} one call {one * 1e3:.3f} ms, five calls {five * 1e3:.3f} ms: "
            f"{five / one:.2f}x")
    del c

    # The retrieval index on this device: top-10 search against scoring + torch.topk.
    try:
        rows += index_search_rows(dev, sizes, ceilings)
    except Exception as err:  # a row, not a crash: the loss cases below still run
        traceback.print_exc()
        log(f"   index search: {type(err).__name__}: {err}")

    # The fused loss: forward + backward, time and peak memory against the reference.
    n, k = sizes.loss_nq, sizes.loss_hn

    def loss_inputs(seed):
        return [unit_tokens(s, bf16, dev.device, 30 + seed).requires_grad_()
                for s in ((n, rq, d), (n, rc, d), (n, k, rc, d))]

    xs = loss_inputs(0)

    def step(fn):
        q, cc, hn = xs
        for t in xs:
            t.grad = None
        fn(q, cc, hn).backward()

    loss_fns = {name: (lambda q, cc, hn, b=runs_as: matryoshka_infonce(q, cc, DEFAULT_GROUPS, hard_negatives=hn,
                                                                        backend=b))
                for name, runs_as in providers.items()}
    loss_fns["reference"] = lambda q, cc, hn: reference.matryoshka_infonce(q, cc, DEFAULT_GROUPS, hard_negatives=hn)
    times, peaks = {}, {}
    for name, fn in loss_fns.items():
        try:
            times[name] = dev.bench(lambda: step(fn))
            peaks[name] = peak_extra_mib(dev, lambda: step(fn))
        except Exception as err:
            log(f"   loss {name}: {type(err).__name__}: {err}")
    if "reference" not in times:
        raise StageError("the reference loss step failed (see the log); turn loss_nq down with --set")
    # Where the step's time goes: the forward alone, and the step without hard negatives.
    q0, c0, h0 = xs
    parts = {}
    for name, runs_as in providers.items():
        try:
            with torch.no_grad():
                fwd = dev.bench(lambda: matryoshka_infonce(q0, c0, DEFAULT_GROUPS, hard_negatives=h0, backend=runs_as))
            no_hn = dev.bench(lambda: step(lambda q, cc, hn: matryoshka_infonce(q, cc, DEFAULT_GROUPS, backend=runs_as)))
        except Exception as err:
            log(f"   loss parts {name}: {type(err).__name__}: {err}")
            continue
        parts[name] = dict(forward_ms=sig(fwd * 1e3), step_without_hard_negatives_ms=sig(no_hn * 1e3))
        log(f"   loss {n}x{n}+{k}hn parts {name:9} forward alone {fwd * 1e3:.3f} ms, "
            f"fwd+bwd without hard negatives {no_hn * 1e3:.3f} ms")
    flops = 3 * 2.0 * n * (n + k) * rq * rc * d  # forward tile + two gradient products
    for name, t in times.items():
        row = dict(case=f"loss {n}x{n}+{k}hn", provider=name, ms=sig(t * 1e3), tflops=sig(flops / t / 1e12),
                   peak_mib=peaks[name], x_reference=sig(times["reference"] / t), **parts.get(name, {}))
        rows.append(row)
        log(f"   loss {n}x{n}+{k}hn fwd+bwd {name:9} {row['ms']:10.3f} ms  {row['tflops']:8.3f} TFLOP/s  "
            f"peak +{row['peak_mib']} MiB  {row['x_reference']:.2f}x reference")
    return dict(rows=rows)


def index_search_rows(dev: Device, sizes: Sizes, ceilings: Dict) -> List[Dict]:
    """MultiVectorIndex (bf16) on the device, issue 12's synthetic setting (N = 200k, D = 128,
    Rc = 64): search(q, 10) at (1, 1) with one query (memory-bound: its prefix slab's bytes
    against the copy rate) and at the full budget with 16 queries, each against
    maxsim_grouped of the same budget plus torch.topk (the fusion ratio)."""
    import torch

    from metaembed_kernels import MultiVectorIndex, maxsim_grouped

    n, rc, d = sizes.search_n, sizes.rc, sizes.search_d
    c = unit_tokens((n, rc, d), torch.bfloat16, dev.device, 40)
    index = MultiVectorIndex(d, rc, dtype="bfloat16", device=dev.device)
    index.add(c)
    rows = []
    for nq, budget in ((1, (1, 1)), (16, (sizes.rq, rc))):
        q = unit_tokens((nq, sizes.rq, d), torch.bfloat16, dev.device, 41 + nq)
        search = dev.bench(lambda: index.search(q, 10, budget=budget))
        cb = c[:, :budget[1]]
        score = dev.bench(lambda: torch.topk(maxsim_grouped(q, cb, (budget,), backend=dev.backends["triton"])[0], 10))
        nbytes = n * budget[1] * d * 2
        row = dict(case=f"index search {nq}q x {n} {budget}", provider="index", ms=sig(search * 1e3),
                   gb_per_s=sig(nbytes / search / 1e9), score_topk_ms=sig(score * 1e3), x_score_topk=sig(score / search))
        if nq == 1:
            row.update(roofline="copy bandwidth", fraction=sig(nbytes / search / 1e9 / ceilings["copy_gb_per_s"]))
        rows.append(row)
        log(f"   index search {nq}q {budget}: {search * 1e3:.3f} ms ({row['gb_per_s']} GB/s of slab), "
            f"maxsim_grouped + topk {score * 1e3:.3f} ms: {row['x_score_topk']}x")
    return rows


def peak_extra_mib(dev: Device, fn) -> Optional[float]:
    """Peak device memory one call allocates beyond what was live before it (GPU only)."""
    import torch

    if dev.dry:
        return None
    dev.sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    dev.sync()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def run_child(args, sizes: Sizes) -> int:
    result = dict(status="ok")
    try:
        import torch

        if args.dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
            torch.manual_seed(0)
        elif not torch.cuda.is_available():
            raise StageError("torch sees no CUDA device")
        dev = Device(args.dry_run, sizes)
        if args.child == "ceilings":
            result.update(stage_ceilings(dev, sizes))
        elif args.child == "parity":
            result.update(stage_parity(dev, sizes))
        elif args.child == "sanitize-case":
            stage_sanitize_case(dev, sizes)
        elif args.child == "speed":
            with open(os.path.join(args.out, "gpu_check.json")) as f:
                ceilings = json.load(f)["stages"]["ceilings"]
            result.update(stage_speed(dev, sizes, ceilings))
        else:
            raise StageError(f"unknown stage {args.child}")
    except StageError as err:
        result.update(status="stopped", reason=str(err))
    except Exception as err:
        traceback.print_exc()
        result.update(status="error", reason=f"{type(err).__name__}: {err}")
    if args.child_result:
        with open(args.child_result, "w") as f:
            json.dump(result, f, default=str)
    return 0 if result["status"] == "ok" else 1


# ---------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------
def verdict_table(results: Dict) -> str:
    env = results.get("environment", {})
    lines = ["", "=" * 100,
             f"gpu-check verdict{' (DRY RUN on CPU: no GPU number below is real)' if results['dry_run'] else ''}: "
             f"{env.get('gpu')} | torch {env.get('torch')} | triton {env.get('triton')} | CUDA {env.get('torch_cuda')}"
             f" | nvcc {env.get('nvcc')} | {results.get('seconds', 0):.0f} s",
             "", "| stage | status | s | note |", "|---|---|---|---|"]
    for name, r in results["stages"].items():
        note = r.get("reason", "")
        if name == "build" and r.get("built"):
            note = f"compile {r.get('compile_seconds')} s, TORCH_CUDA_ARCH_LIST={r['plan']['env']['TORCH_CUDA_ARCH_LIST']}"
        if name == "ceilings" and r["status"] == "ok":
            note = (f"copy {r['copy_gb_per_s']} GB/s, bf16 matmul {r['matmul_bf16_tflops']} TFLOP/s, "
                    f"fp32 {r['matmul_fp32_tflops']} TFLOP/s")
        if name == "correctness" and "pytest" in r:
            bad = sum(not p["ok"] for p in r.get("parity", []))
            note = f"parity {len(r.get('parity', [])) - bad}/{len(r.get('parity', []))} ok; pytest: {r['pytest']['summary']}"
        if name == "sanitizer" and "tools" in r:
            note = "; ".join(f"{k} {v['status']}: {v['summary']}" for k, v in r["tools"].items())
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {note[:200]} |")
    speed = results["stages"].get("speed", {}).get("rows")
    if speed:
        lines += ["", "| case | provider | ms | % of roofline | x reference | note |", "|---|---|---|---|---|---|"]
        for r in speed:
            frac = f"{100 * r['fraction']:.1f}% of {r['roofline']}" if "fraction" in r else "-"
            note = ""
            if "x_five_calls" in r:
                note = f"five separate calls: {r['five_calls_ms']} ms ({r['x_five_calls']}x)"
            if r.get("peak_mib") is not None:
                note = f"peak +{r['peak_mib']} MiB"
            if "x_score_topk" in r:
                note = f"maxsim_grouped + topk {r['score_topk_ms']} ms ({r['x_score_topk']}x)"
            if "forward_ms" in r:
                note += f"; forward alone {r['forward_ms']} ms, step without hard negatives {r['step_without_hard_negatives_ms']} ms"
            finding = []
            if r["provider"] != "reference" and r.get("x_reference", 2) < 1:
                finding.append("SLOWER than reference")
            if r["provider"] != "reference" and r.get("fraction", 1) < 0.5:
                finding.append("< 50% of roofline")
            note = "; ".join(filter(None, [note] + finding))
            lines.append(f"| {r['case']} | {r['provider']} | {r['ms']} | {frac} | {r.get('x_reference', '-')} | {note} |")
    bad = [n for n, r in results["stages"].items() if r["status"] != "ok"]
    lines += ["", "VERDICT: " + ("PASS" if not bad else "FAIL (" + ", ".join(bad) + ")")
              + (" -- dry run" if results["dry_run"] else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every Python stage on CPU at tiny sizes")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "gpu-check"), help="JSON and logs go here")
    ap.add_argument("--build-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "metaembed-kernels",
                                                        "gpu-check-build"), help="out-of-tree build")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a size (Sizes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = parse_sets(DRY if args.dry_run else FULL, args.set)
    if args.child:
        return run_child(args, sizes)
    os.makedirs(args.out, exist_ok=True)
    return Check(args, sizes).run()


if __name__ == "__main__":
    sys.exit(main())
