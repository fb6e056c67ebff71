"""Ratio tables from benchmark medians (shared by conftest.py and report.py)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

BASELINES = ("reference", "einsum-top-budget", "matmul")
OURS = ("cpu", "triton", "cuda")


def ratio_table(rows: List[Dict], peak_gflops: float) -> str:
    """rows: dicts with workload, dtype, provider, median (s), flops. Markdown table."""
    by_case = defaultdict(dict)
    flops = {}
    for r in rows:
        by_case[(r["workload"], r["dtype"])][r["provider"]] = r["median"]
        flops[r["workload"]] = r["flops"]
    lines = [
        f"FMA peak measured in this run: {peak_gflops:.1f} GFLOP/s",
        "",
        "| workload | dtype | provider | median ms | GFLOP/s | % of FMA peak | x vs reference | x vs matmul | x vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (w, dt), times in sorted(by_case.items()):
        peers = {p: t for p, t in times.items() if p not in BASELINES + OURS}
        best_peer = min(peers.values()) if peers else None
        for p, t in sorted(times.items(), key=lambda kv: kv[1]):
            gf = flops[w] / t / 1e9
            frac = f"{100 * gf / peak_gflops:.0f}%" if peak_gflops else "-"

            def ratio(base):
                return f"{base / t:.2f}" if base else "-"

            lines.append(
                f"| {w} | {dt} | {p} | {t * 1e3:.1f} | {gf:.1f} | {frac} | {ratio(times.get('reference'))} "
                f"| {ratio(times.get('matmul'))} | {ratio(best_peer)} |"
            )
    return "\n".join(lines)
