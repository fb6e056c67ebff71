"""pytest-benchmark suite: `pytest benchmarks --benchmark-only` (`make bench`).

Every benchmark records GFLOP/s and the fraction of the peak measured in the same run for
its dtype (extra_info; summary.py says which instruction each peak times). The terminal
summary prints ONE table first: per workload and dtype, the cpu backend's median as a
ratio against the reference einsum, torch.matmul of the same FLOPs and the fastest peer.
The wide per-provider tables go to results/bench/per_provider.md (next to the raw data
that `make bench` saves as results/bench/benchmarks.json).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from summary import measure_peaks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDE_TABLES = os.environ.get("METAEMBED_BENCH_TABLES", os.path.join(REPO, "results", "bench", "per_provider.md"))
_PEAKS = {}


@pytest.fixture(scope="session")
def peaks():
    """{dtype name: {gflops, instruction}}: this CPU's peak for the instruction our kernels
    issue for each dtype, all torch threads, measured by the extension's calibration loops."""
    if not _PEAKS:
        _PEAKS.update(measure_peaks(0.5))
    return _PEAKS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from summary import ratio_table, summary_rows, summary_table

    rows = summary_rows((bench.extra_info, bench.stats.median if bench.stats is not None else None)
                        for bench in session.benchmarks)
    if not rows:
        return
    # peaks measured again after the run: each is the best of before and after, so a busy
    # machine at one of the two moments cannot push a "% of peak" past 100%
    for dtype, after in measure_peaks(0.5).items():
        if dtype not in _PEAKS or after["gflops"] > _PEAKS[dtype]["gflops"]:
            _PEAKS[dtype] = after
    terminalreporter.write_sep("=", "metaembed-kernels: the cpu backend in this run (medians)")
    terminalreporter.write_line(summary_table(rows, _PEAKS))
    wide = [ratio_table(rows, _PEAKS)]
    memory = [r for r in rows if "peak_extra_memory_mb" in r]
    if memory:
        wide.append("\n| workload | dtype | provider | peak extra memory (MiB) |\n|---|---|---|---|")
        wide += [f"| {r['workload']} | {r['dtype']} | {r['provider']} | {r['peak_extra_memory_mb']:.1f} |"
                 for r in memory]
    os.makedirs(os.path.dirname(WIDE_TABLES), exist_ok=True)
    with open(WIDE_TABLES, "w") as f:
        f.write("# make bench: every provider\n\n" + "\n".join(wide) + "\n")
    # the shorter spelling of the path; on its own line when the label and path pass 120 columns
    # (a file name cannot be wrapped, the summary table above stays within 120)
    path = min(os.path.relpath(WIDE_TABLES), os.path.abspath(WIDE_TABLES), key=len)
    label = "Every provider, GFLOP/s and memory:"
    terminalreporter.write_line("\n" + label + ("\n" if len(label) + 1 + len(path) > 120 else " ") + path)
