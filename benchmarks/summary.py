"""Tables from benchmark medians (shared by conftest.py and report.py).

"% of peak" is measured against the peak of the instruction our CPU kernels issue for
that dtype on the ISA that ran (csrc/cpu/isa_*.cpp calibration loops, `_C.peak_gflops`):
512-bit FMA on avx512, vdpbf16ps for bf16 on avx512_bf16 (twice the FLOPs per
instruction), 256-bit FMA on avx2. So no "% of peak" exceeds 100% except by noise.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

BASELINES = ("reference", "einsum-top-budget", "matmul")
OURS = ("cpu", "triton", "cuda")
PEAK_DTYPE = {"float32": "fp32", "float16": "fp32", "bfloat16": "bf16"}  # fp16 is widened to fp32


def measure_peaks(seconds: float = 0.5) -> Dict[str, dict]:
    """{dtype name: {gflops, instruction}} for the active CPU ISA ({} without the extension)."""
    from metaembed_kernels import _extension

    if not _extension.is_loaded():
        return {}
    measured = {kind: dict(gflops=_extension._C.peak_gflops(kind, 0, seconds),
                           instruction=_extension._C.peak_instruction(kind), kind=kind)
                for kind in sorted(set(PEAK_DTYPE.values()))}
    return {dtype: measured[kind] for dtype, kind in PEAK_DTYPE.items()}


def peaks_line(peaks: Dict[str, dict]) -> str:
    if not peaks:
        return "Peaks: not measured (C++ extension not built)"
    seen = {}
    for v in peaks.values():
        seen.setdefault(v["kind"], f"{v['kind']} {v['gflops']:.1f} GFLOP/s, {v['instruction']}")
    return "Peaks (this run): " + "; ".join(seen.values())


def _fraction(peaks: Dict[str, dict], dtype: str, gflops: float) -> str:
    peak = peaks.get(dtype, {}).get("gflops")
    return f"{100 * gflops / peak:.0f}%" if peak else "-"


SUMMARY_KEYS = ("workload", "dtype", "provider", "flops")


def summary_rows(benchmarks) -> List[Dict]:
    """(extra_info, median seconds or None) of each benchmark -> the rows of the FLOP tables:
    the workload benchmarks. Others (backward ratio, paired, index, integrations) print their
    own ratio lines and carry no FLOP count, so they stay out of these tables."""
    return [dict(info, median=median) for info, median in benchmarks
            if median is not None and all(k in info for k in SUMMARY_KEYS)]


def _by_case(rows: List[Dict]):
    by_case = defaultdict(dict)
    flops = {}
    for r in rows:
        by_case[(r["workload"], r["dtype"])][r["provider"]] = r["median"]
        flops[r["workload"]] = r["flops"]
    return by_case, flops


def _fastest_peer(times: Dict[str, float]) -> Optional[tuple]:
    peers = {p: t for p, t in times.items() if p not in BASELINES + OURS}
    return min(peers.items(), key=lambda kv: kv[1]) if peers else None


def summary_table(rows: List[Dict], peaks: Dict[str, dict], ours: str = "cpu") -> str:
    """One line per (workload, dtype): our backend's median and its ratios (<= 120 columns)."""
    by_case, flops = _by_case(rows)
    lines = [
        peaks_line(peaks),
        "",
        f"| workload | dtype | {ours} ms | % of peak | x reference | x matmul | x fastest peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for (w, dt), times in sorted(by_case.items()):
        t = times.get(ours)
        if t is None:
            continue

        def ratio(base):
            return f"{base / t:.2f}" if base else "-"

        peer = _fastest_peer(times)
        peer_text = f"{peer[1] / t:.2f} ({peer[0]})" if peer else "-"
        frac = _fraction(peaks, dt, flops[w] / t / 1e9) if flops[w] else "-"
        lines.append(f"| {w} | {dt} | {t * 1e3:.1f} | {frac} | {ratio(times.get('reference'))} "
                     f"| {ratio(times.get('matmul'))} | {peer_text} |")
    return "\n".join(lines)


def ratio_table(rows: List[Dict], peaks: Dict[str, dict]) -> str:
    """Every provider of every case (wide): rows with workload, dtype, provider, median (s), flops."""
    by_case, flops = _by_case(rows)
    lines = [
        peaks_line(peaks),
        "",
        "| workload | dtype | provider | median ms | GFLOP/s | % of peak | x vs reference | x vs matmul "
        "| x vs fastest peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (w, dt), times in sorted(by_case.items()):
        peer = _fastest_peer(times)
        best_peer = peer[1] if peer else None
        for p, t in sorted(times.items(), key=lambda kv: kv[1]):
            gf = flops[w] / t / 1e9

            def ratio(base):
                return f"{base / t:.2f}" if base else "-"

            lines.append(
                f"| {w} | {dt} | {p} | {t * 1e3:.1f} | {gf:.1f} | {_fraction(peaks, dt, gf)} "
                f"| {ratio(times.get('reference'))} | {ratio(times.get('matmul'))} | {ratio(best_peer)} |"
            )
    return "\n".join(lines)
