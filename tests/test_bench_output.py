"""What `make bench` shows a newcomer: one summary table first (<= 120 columns), one line
per skip reason, the wide per-provider tables in a file; progress lines for the build and
the peer installs, and pip's expected resolver notes kept out of the terminal."""
import os
import re
import subprocess
import sys

import pytest

from helpers import requires_extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def rows():
    out = []
    for w in ("W1", "W2", "W3", "W4", "W5", "L1"):
        for dt in ("float32", "bfloat16"):
            for i, p in enumerate(("cpu", "reference", "einsum-top-budget", "matmul", "pylate", "colpali",
                                   "maxsim-cpu", "maxsim-fast", "fast-maxsim")):
                out.append(dict(workload=w, dtype=dt, provider=p, median=0.01 * (i + 1), flops=3e9))
    return out


PEAKS = {"float32": dict(gflops=228.0, instruction="512-bit FMA (zmm)", kind="fp32"),
         "float16": dict(gflops=228.0, instruction="512-bit FMA (zmm)", kind="fp32"),
         "bfloat16": dict(gflops=456.0, instruction="512-bit vdpbf16ps (zmm)", kind="bf16")}


def test_summary_is_one_row_per_case_within_120_columns():
    from summary import summary_table

    text = summary_table(rows(), PEAKS)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    table = [line for line in lines if line.startswith("| W") or line.startswith("| L")]
    assert len(table) == 12  # 6 workloads x 2 dtypes, cpu only
    assert "fp32 228.0 GFLOP/s, 512-bit FMA" in lines[0] and "bf16 456.0 GFLOP/s, 512-bit vdpbf16ps" in lines[0]
    # % of peak uses the dtype's own peak: W1 cpu does 3 GFLOP in 10 ms = 300 GFLOP/s
    assert "| W1 | bfloat16 | 10.0 | 66% |" in text and "| W1 | float32 | 10.0 | 132% |" in text


def test_make_bench_recipe():
    makefile = open(os.path.join(REPO, "Makefile")).read()
    bench = re.search(r"^bench: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "-rs" in bench and "--benchmark-quiet" in bench and "--benchmark-json=results/bench/" in bench
    peers = re.search(r"^\$\(VENV\)/\.peers: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert ">>$(VENV)/bench-deps.log 2>&1" in peers  # pip's output (resolver notes included) to a log
    assert "bench-deps [%d/%d]" in peers  # progress
    built = re.search(r"^\$\(VENV\)/\.built: .*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "[0-9]+/[0-9]+" in built and "build.log" in built  # ninja's [n/N] lines shown, log kept


@requires_extension
def test_bench_terminal_shows_the_summary_first_and_writes_the_wide_tables(tmp_path):
    wide = tmp_path / "per_provider.md"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_cpu.py", "--benchmark-only", "--benchmark-quiet",
           "-q", "-rs", "-p", "no:cacheprovider", "-k", "W0-float32-cpu or W0-float32-matmul or W0-float32-pylate"]
    # not as an xdist worker (make test runs under pytest-xdist): pytest-benchmark would see
    # PYTEST_XDIST_WORKER and refuse --benchmark-only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(env, METAEMBED_BENCH_TABLES=str(wide)))
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    summary_at = out.index("metaembed-kernels: the cpu backend in this run")
    assert "| W0 | float32 |" in out[summary_at:]
    assert "Name (time in" not in out  # pytest-benchmark's own wide tables are not printed
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all(out.index(line) > summary_at for line in skips)  # the table comes first
    # every line within 120 columns but the wide tables' file name, which cannot wrap (CI's
    # tmp path once made the label + path line 121 wide)
    lines = [line for line in out[summary_at:].splitlines() if not line.endswith(wide.name)]
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    path_line = next(line for line in out[summary_at:].splitlines() if line.endswith(wide.name))
    assert len(path_line) <= 120 or path_line in (os.path.relpath(wide, REPO), str(wide))
    text = wide.read_text()
    assert "| W0 | float32 | cpu |" in text and "| W0 | float32 | matmul |" in text


def test_benchmarks_without_a_flop_count_stay_out_of_the_summary():
    """benchmarks/test_bench_backward.py (a ratio, no FLOPs) crashed the summary: KeyError 'flops'."""
    from summary import summary_rows

    workload = dict(workload="W1", dtype="float32", provider="cpu", flops=1e9)
    rows = summary_rows([(workload, 0.5), (dict(workload="L1", dtype="float32", provider="cpu"), 0.2),
                         (dict(workload, provider="einsum"), None)])
    assert rows == [dict(workload, median=0.5)]
