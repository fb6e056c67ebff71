"""Alternating-rounds benchmark report: the table for the issue notes.

    python benchmarks/report.py [--workloads W1,W2,W3,W4,L1] [--dtypes float32,bfloat16]
                                [--rounds 5] [--out results/cpu_report.md]

For each workload and dtype every available provider is warmed up once, then timed for
`rounds` rounds; within a round the providers run one after the other, in an order that
rotates from round to round, so slow drifts of the machine (thermal, neighbours) hit every
provider alike. Medians are reported with the FMA peak measured before and after, as
ratios against the reference einsum, torch.matmul of the same FLOPs and the fastest peer:
first one summary table (the cpu backend), then every provider. Peaks are per dtype: the
instruction our kernels issue (summary.py).
Loss workloads also report the peak extra memory of one forward+backward (fresh process).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import measure_peaks, peaks_line, ratio_table, summary_table  # noqa: E402
from workloads import PROVIDERS, WORKLOADS, Unavailable, get_callable, make_inputs, peak_extra_memory_mb  # noqa: E402

from metaembed_kernels import _extension  # noqa: E402

CPU_PROVIDERS = [p for p in PROVIDERS if p not in ("triton", "cuda")]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3,W4,L1")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--providers", default=",".join(CPU_PROVIDERS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    threads = torch.get_num_threads()
    peaks_before = measure_peaks(0.5)
    rows, skipped, memory = [], [], []
    for wname in args.workloads.split(","):
        w = WORKLOADS[wname]
        for dtname in args.dtypes.split(","):
            dtype = getattr(torch, dtname)
            x = make_inputs(w, dtype)
            fns = {}
            for p in args.providers.split(","):
                try:
                    fns[p] = get_callable(p, w, dtype, x)
                    fns[p]()  # warm-up round
                except Unavailable as err:
                    skipped.append(f"{wname} {dtname} {p}: {err}")
            times = {p: [] for p in fns}
            order = list(fns)
            for r in range(args.rounds):
                for p in order[r % len(order):] + order[: r % len(order)]:
                    times[p].append(timed(fns[p]))
            for p, ts in times.items():
                rows.append(dict(workload=wname, dtype=dtname, provider=p, median=statistics.median(ts),
                                 flops=w.flops))
                print(f"{wname} {dtname} {p}: median {statistics.median(ts) * 1e3:.1f} ms "
                      f"({', '.join(f'{t * 1e3:.0f}' for t in ts)})", flush=True)
            if w.kind == "loss":
                for p in fns:
                    memory.append((wname, dtname, p, peak_extra_memory_mb(p, w, dtname, threads)))
            del fns, x
    peaks_after = measure_peaks(0.5)
    # the best of before and after: a busy moment cannot push a "% of peak" past 100%
    peaks = {dt: max(v, peaks_after[dt], key=lambda p: p["gflops"]) for dt, v in peaks_before.items()}

    lines = [
        f"# CPU benchmark report ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `python benchmarks/report.py --workloads {args.workloads} --dtypes {args.dtypes} "
        f"--rounds {args.rounds}`",
        f"Machine: {platform.processor() or platform.machine()}, {threads} torch threads, CPU kernels: "
        f"{_extension.cpu_isa()}; before: {peaks_line(peaks_before)}; after: {peaks_line(peaks_after)}",
        f"Medians of {args.rounds} alternating rounds after one warm-up round; FLOPs = 2*Nq*(Nc+K)*Rq*Rc*D "
        "(top-budget tile, once).",
        "",
        summary_table(rows, peaks),
        "",
        "Every provider:",
        "",
        ratio_table(rows, peaks),
    ]
    if memory:
        lines += ["", "| workload | dtype | provider | peak extra memory (MiB) |", "|---|---|---|---|"]
        lines += [f"| {w} | {d} | {p} | {m:.1f} |" for w, d, p, m in memory]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in skipped]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
