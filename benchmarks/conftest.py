"""pytest-benchmark suite: `pytest benchmarks --benchmark-only`.

Every benchmark records GFLOP/s and the fraction of the FMA peak measured in the same run
(extra_info); the terminal summary prints, per workload and dtype, each provider's median
as a ratio against the reference einsum, torch.matmul of the same FLOPs and the fastest peer.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from metaembed_kernels import _extension  # noqa: E402

_PEAK = {}


@pytest.fixture(scope="session")
def fma_peak_gflops():
    """FMA throughput peak of this CPU, all torch threads, measured by a tiny C++ loop."""
    if "value" not in _PEAK:
        _PEAK["value"] = _extension._C.fma_peak_gflops(0, 0.5) if _extension.is_loaded() else 0.0
    return _PEAK["value"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from summary import ratio_table

    rows = []
    for bench in session.benchmarks:
        info = bench.extra_info
        if "workload" in info and bench.stats is not None:
            rows.append(dict(info, median=bench.stats.median))
    if rows:
        terminalreporter.write_sep("=", "metaembed-kernels: ratios in this run (medians)")
        terminalreporter.write_line(ratio_table(rows, _PEAK.get("value", 0.0)))
        memory = [r for r in rows if "peak_extra_memory_mb" in r]
        if memory:
            terminalreporter.write_line("\n| workload | dtype | provider | peak extra memory (MiB) |\n|---|---|---|---|")
            for r in memory:
                terminalreporter.write_line(
                    f"| {r['workload']} | {r['dtype']} | {r['provider']} | {r['peak_extra_memory_mb']:.1f} |"
                )
