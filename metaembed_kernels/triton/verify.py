"""Compile gate: every kernel configuration the launchers can select, compiled ahead of time
for real GPUs (no GPU needed), with checks on the generated code.

    python -m metaembed_kernels.triton.verify [--targets 80,90] [--dtypes bf16,fp16,fp32] [--jobs N]

For each target (sm_80 = A100, sm_90 = H100), dtype, D in {128, 3584} and (Rq, Rc) in
{(16, 64), (32, 128)} -- plus (64, 64), the other corner of the single-tile token tiles, and
the chunked budgets (32, 1030) (ColPali pages: 128-token column chunks), (64, 300) (ColBERT
documents against 64-token queries: 64-token column chunks), (96, 64) (64-token row chunks)
and (96, 300) (both) -- it builds the launch plans the ops would build (launch.py, from meta
tensors, so the paper's sizes cost nothing): the MaxSim forward at every query-count bucket
of the heuristic table, both backward passes, the fused loss forward/backward with hard
negatives, with the MetaEmbed groups and with more than 8 groups (the unchunked loss state's
16-row padding; chunked launches take groups 8 at a time), the per-query-candidate kernels
(own_candidate_plans: paired MaxSim's forward and backward passes), and the retrieval index's scoring
kernel (index_launch.py: float32, bfloat16 and int8 indexes, every tile some Nq picks, with and
without candidate masks; single-tile shapes). Runtime arguments get the specialisation a real launch gets (Triton's own specialize
function: ints equal to 1 become constants, multiples of 16 and aligned pointers get
divisibility hints; n_groups is never specialised). Identical compiles are done once: the
kernels are D-agnostic (D=128 and D=3584 specialise identically, so they share a row).

Checks per compiled kernel:
  * 16-bit inputs: the PTX contains tensor-core MMA -- mma.sync on sm_80; on sm_90 mma.sync
    or wgmma, and wgmma for the main forward configuration (MaxSim forward, 128-row tile);
  * `cuobjdump --dump-resource-usage` (the one bundled with triton) reports LOCAL:0 and
    STACK:0 -- ptxas 13.x reports register spills as stack frames with LOCAL:0 (seen:
    "4096 bytes stack frame, 7308 bytes spill stores" printed as REG:32 STACK:4200 LOCAL:0);
  * dynamic shared memory <= 163 KiB (what one sm_80 block can get).
fp32 similarity tiles are ieee FMA dots by design (their gradient products use bf16 MMA),
so an fp32 row may say "fma"; the other checks apply to it.
Prints one row per configuration and exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SHARED_LIMIT = 163 * 1024  # bytes of dynamic shared memory per block on sm_80
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SINGLE_TILE_SHAPES = ((16, 64), (32, 128), (64, 64))  # the grid + the largest square token tile
# Chunked budgets, one per class of chunked tiles (heuristics.py's table): r_c chunks of 128
# tokens (r_q <= 32) and of 64 (r_q <= 64, two candidates per forward tile), r_q chunks, both.
# Any other chunked budget gets a tile no larger than these (tests/test_triton.py checks it).
CHUNKED_SHAPES = ((32, 1030), (64, 300), (96, 64), (96, 300))
SHAPES = SINGLE_TILE_SHAPES + CHUNKED_SHAPES
DIMS = (128, 3584)
PAPER_GROUPS = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))


def groups_for(rq: int, rc: int, many: bool = False) -> Tuple[Tuple[int, int], ...]:
    base = [g for g in PAPER_GROUPS if g[0] <= rq and g[1] <= rc] + [(rq, rc)]
    if many:  # > 8 groups: the loss forward's state gets 16 rows
        base += [(max(1, rq // 2), k) for k in range(1, 6)]
    return tuple(dict.fromkeys(base))


def candidate_plans(dtype: torch.dtype, rq: int, rc: int, d: int):
    """(workload label, LaunchPlan) for every launch the ops can make at this shape."""
    from . import heuristics as H
    from . import launch as L

    meta = dict(dtype=dtype, device="meta")
    out = []

    def problem(nq, nc, groups):
        q = torch.empty(nq, rq, d, **meta)
        c = torch.empty(nc, rc, d, **meta)
        return L.make_problem(q, c, [g[0] for g in groups], [g[1] for g in groups], None, None, interpret=False)

    # MaxSim forward: Nq = 1 (the paper's retrieval setting) and one Nq per tile-height bucket.
    rq_tile, _ = H.token_tiles(rq, rc)
    query_counts = {1}
    for m in (16, 32, 64, 128):
        if m >= rq_tile:
            query_counts.add(max(1, m // rq_tile))
    for nq in sorted(query_counts):
        p = problem(nq, 100_000, groups_for(rq, rc))
        for plan in L.plan_maxsim_forward(p)[1]:
            out.append((f"Nq={nq}", plan))
    # Backward and loss: the paper's training batch (384 gathered candidates, 1 hard negative).
    for many in (False, True):
        groups = groups_for(rq, rc, many)
        p = problem(384, 384, groups)
        label = f"G={len(groups)}"
        if not many:
            grad = torch.empty(len(groups), 384, 384, dtype=torch.float32, device="meta")
            for plan in L.plan_maxsim_backward(p, grad)[2]:
                out.append((label, plan))
        hn = L.make_hard_negatives(p, torch.empty(384, 1, rc, d, **meta), None)
        labels = torch.empty(384, dtype=torch.int64, device="meta")
        for plan in L.plan_infonce_forward(p, hn, labels, 1 / 0.03)[2]:
            out.append((label, plan))
        if not many:
            terms = torch.empty(len(groups), 384, dtype=torch.float32, device="meta")
            for plan in L.plan_infonce_backward(p, hn, labels, 1 / 0.03, terms, terms)[3]:
                out.append((label, plan))
    # The retrieval index's scoring kernel (index_launch.py): single-tile budgets only.
    from . import index_launch

    out += index_launch.gate_plans(dtype, rq, rc, d)
    out += own_candidate_plans(dtype, rq, rc, d)
    return out


@functools.lru_cache(maxsize=None)
def shape_plans(dtype_name: str, rq: int, rc: int, d: int):
    """candidate_plans, planned once per shape: collect() fills this cache before the compile
    workers fork, so they inherit it (planning a shape takes ~0.2 s, which every one of the
    gate's ~600 compiles used to repeat)."""
    return tuple(candidate_plans(DTYPES[dtype_name], rq, rc, d))


def own_candidate_plans(dtype: torch.dtype, rq: int, rc: int, d: int):
    """(workload label, LaunchPlan) of paired MaxSim (B = 384 queries x N = 4 candidates each;
    its tiles do not depend on B or N): the forward and both backward passes (dq, dc), which
    are the per-query-candidate kernels the loss's hard negatives use, with IS_LOSS=False; and
    with more than 8 groups, for both (the accumulating dx pass of chunked budgets). An
    output_mask only drops passes: it selects no other compile."""
    from . import launch as L

    meta = dict(dtype=dtype, device="meta")
    groups = groups_for(rq, rc)
    label = f"G={len(groups)}"
    q = torch.empty(384, rq, d, **meta)
    paired = L.make_problem(q, torch.empty(384, 4, rc, d, **meta), [g[0] for g in groups], [g[1] for g in groups],
                            None, None, interpret=False, paired=True)
    out = [(label, plan) for plan in L.plan_maxsim_paired_forward(paired)[1]]
    grad = torch.empty(len(groups), 384, 4, dtype=torch.float32, device="meta")
    out += [(label, plan) for plan in L.plan_maxsim_paired_backward(paired, grad)[2]]
    # More than 8 groups: a chunked budget takes them in several launches, so the dx pass adds
    # into an fp32 accumulator (not DIRECT) -- for paired MaxSim and the loss's hard negatives.
    many = groups_for(rq, rc, many=True)
    many_rq, many_rc, label = [g[0] for g in many], [g[1] for g in many], f"G={len(many)}"
    paired = L.make_problem(q, torch.empty(384, 4, rc, d, **meta), many_rq, many_rc, None, None,
                            interpret=False, paired=True)
    grad = torch.empty(len(many), 384, 4, dtype=torch.float32, device="meta")
    out += [(label, plan) for plan in L.plan_maxsim_paired_backward(paired, grad)[2]]
    p = L.make_problem(q, torch.empty(384, rc, d, **meta), many_rq, many_rc, None, None, interpret=False)
    hn = L.make_hard_negatives(p, torch.empty(384, 1, rc, d, **meta), None)
    terms = torch.empty(len(many), 384, dtype=torch.float32, device="meta")
    labels = torch.empty(384, dtype=torch.int64, device="meta")
    out += [(label, plan) for plan in L.plan_infonce_backward(p, hn, labels, 1 / 0.03, terms, terms)[3]
            if "hard negatives" in plan.role]
    return out


def specialise(plan) -> Tuple[dict, dict, dict]:
    """Signature, constexprs and attrs exactly as triton's JIT would derive them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for idx, (name, param) in enumerate(zip(plan.kernel.arg_names, plan.kernel.params)):
        if name in plan.constexprs:
            signature[name] = "constexpr"
            constexprs[(idx,)] = plan.constexprs[name]
            continue
        kind, spec = native_specialize_impl(BaseBackend, plan.args[name], False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(idx,)] = spec
        elif isinstance(spec, str):
            attrs[(idx,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def cuobjdump_path() -> str:
    import triton.backends.nvidia.compiler as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.search(rf"\b{key}:(\d+)", text)
        if found is None:
            raise RuntimeError(f"cuobjdump printed no {key}: {text!r}")
        usage[key] = int(found.group(1))
    return usage


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.aligned", ptx):
        return "mma.sync"
    return "fma"


@dataclasses.dataclass
class Row:
    target: int
    role: str
    dtype: str
    shape: str
    dims: List[int]
    workload: str
    tile: str
    regs: int = -1
    shared: int = -1
    local: int = -1
    stack: int = -1
    mma: str = "-"
    seconds: float = 0.0
    failures: List[str] = dataclasses.field(default_factory=list)


def is_main_forward(plan) -> bool:
    return plan.role == "maxsim forward" and plan.config.m == 128


def check(row: Row, plan, dtype_name: str) -> None:
    # Spills show up as LOCAL, or -- seen with ptxas 13.4 on a fp32 FMA kernel reporting
    # "4096 bytes stack frame, 7308 bytes spill stores" -- as STACK with LOCAL:0.
    if row.local != 0 or row.stack != 0:
        row.failures.append(f"LOCAL:{row.local} STACK:{row.stack} (register spills)")
    if row.shared > SHARED_LIMIT:
        row.failures.append(f"shared {row.shared} B > {SHARED_LIMIT} B")
    if dtype_name != "fp32":
        if row.mma == "fma":
            row.failures.append("no tensor-core MMA in PTX")
        if row.target == 80 and row.mma != "mma.sync":
            row.failures.append(f"expected mma.sync on sm_80, got {row.mma}")
        if row.target == 90 and is_main_forward(plan) and row.mma != "wgmma":
            row.failures.append(f"expected wgmma for the main forward config on sm_90, got {row.mma}")


@dataclasses.dataclass
class Job:
    """One distinct compile; (dtype, shape, first D, plan_index) re-create its plan in a worker."""
    target: int
    dtype_name: str
    rq: int
    rc: int
    dims: List[int]
    plan_index: int
    row: Row


def collect(targets: Sequence[int], dtype_names: Sequence[str], dims: Sequence[int] = DIMS,
            shapes: Sequence[Tuple[int, int]] = SHAPES) -> List[Job]:
    """Every launch the ops can make on the grid, deduplicated by what triton would compile."""
    jobs: Dict[tuple, Job] = {}
    for target in targets:
        for dtype_name in dtype_names:
            for rq, rc in shapes:
                for d in dims:
                    for index, (workload, plan) in enumerate(shape_plans(dtype_name, rq, rc, d)):
                        signature, constexprs, attrs = specialise(plan)
                        key = (target, plan.kernel.__name__, repr(sorted(signature.items())),
                               repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                               repr(sorted(plan.config.options().items())))
                        if key in jobs:
                            if d not in jobs[key].row.dims:
                                jobs[key].row.dims.append(d)
                            continue
                        row = Row(target, plan.role, dtype_name, f"({rq},{rc})", [d], workload,
                                  plan.config.describe())
                        jobs[key] = Job(target, dtype_name, rq, rc, [d], index, row)
    return list(jobs.values())


def compile_job(job: Job) -> Row:
    """Compile one configuration for its target and fill in (and check) its row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = job.row
    _, plan = shape_plans(job.dtype_name, job.rq, job.rc, job.dims[0])[job.plan_index]
    signature, constexprs, attrs = specialise(plan)
    start = time.perf_counter()
    try:
        kernel = triton.compile(
            ASTSource(plan.kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", job.target, 32),
            options=plan.config.options(),
        )
        usage = resource_usage(kernel.asm["cubin"])
        row.regs, row.local, row.stack = usage["REG"], usage["LOCAL"], usage["STACK"]
        row.shared = int(kernel.metadata.shared)
        row.mma = mma_kind(kernel.asm["ptx"])
        check(row, plan, job.dtype_name)
    except Exception as err:  # a compile error is a gate failure, not a crash
        row.failures.append(f"compile error: {type(err).__name__}: {str(err)[:300]}")
    row.seconds = time.perf_counter() - start
    return row


def run(targets: Sequence[int], dtype_names: Sequence[str], dims: Sequence[int] = DIMS,
        shapes: Sequence[Tuple[int, int]] = SHAPES, jobs: int = 1, log=print) -> List[Row]:
    if not os.path.exists(cuobjdump_path()):
        raise FileNotFoundError(f"cuobjdump not found at {cuobjdump_path()}")
    work = collect(targets, dtype_names, dims, shapes)
    if jobs <= 1:
        rows = []
        for job in work:
            rows.append(compile_job(job))
            log(format_row(rows[-1]))
        return rows
    import concurrent.futures
    import multiprocessing

    # Fork: the workers inherit the imported kernels; nothing here touches a GPU.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = []
        for row in pool.map(compile_job, work):
            rows.append(row)
            log(format_row(row))
        return rows


HEADER = (f"{'target':7} {'kernel':30} {'dtype':5} {'(Rq,Rc)':8} {'D':9} {'workload':8} "
          f"{'tile':44} {'regs':>4} {'smem':>7} {'local':>5} {'stack':>5} {'mma':8} status")


def format_row(row: Row) -> str:
    status = "ok" if not row.failures else "FAIL: " + "; ".join(row.failures)
    dims = ",".join(str(d) for d in sorted(row.dims))
    return (f"sm_{row.target:<4} {row.role:30} {row.dtype:5} {row.shape:8} {dims:9} {row.workload:8} "
            f"{row.tile:44} {row.regs:>4} {row.shared:>7} {row.local:>5} {row.stack:>5} {row.mma:8} {status}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"any of {','.join(DTYPES)}")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (no warning)
    targets = [int(t) for t in args.targets.split(",")]
    dtype_names = args.dtypes.split(",")
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}")
    print(HEADER, flush=True)
    start = time.perf_counter()
    rows = run(targets, dtype_names, jobs=args.jobs, log=lambda line: print(line, flush=True))
    failed = [r for r in rows if r.failures]
    print(f"{len(rows)} kernel configurations compiled in {time.perf_counter() - start:.0f} s; "
          f"{len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
