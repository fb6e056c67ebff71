"""A/B timing of two builds of this package on the same machine, in alternating rounds.

Two builds cannot share a process (both register the ``metaembed`` op library), so each
round runs one short subprocess per build, back to back, and the ratio B / A is taken per
round; the median over rounds cancels slow drifts of a shared machine. Used to check that a
change costs nothing measurable (e.g. the NaN-propagating max fold of issue 10: <= 3% on
W1-W4)::

    python benchmarks/ab_builds.py --a /path/to/old/checkout --b . --workloads W1,W2,W3,W4 \\
        --dtypes float32,bfloat16 --rounds 7

Each checkout must hold a built extension (``python setup.py build_ext --inplace``, or an
editable install) and is put first on PYTHONPATH for its subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from workloads import WORKLOADS, make_inputs
from metaembed_kernels import maxsim_grouped, matryoshka_infonce
out = {}
for spec in sys.argv[2].split(","):
    name, dtype = spec.split(":")
    w = WORKLOADS[name]
    x = make_inputs(w, getattr(torch, dtype))
    if w.kind == "loss":
        q, c = x["q"].requires_grad_(), x["c"].requires_grad_()
        def fn():
            matryoshka_infonce(q, c, w.groups, hard_negatives=x.get("hn"), backend="cpu").backward()
    else:
        fn = lambda: maxsim_grouped(x["q"], x["c"], w.groups, backend="cpu")
    fn()  # warm-up
    times = []
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    out[spec] = min(times)
print(json.dumps(out))
"""


def run(checkout: str, specs: str, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    res = subprocess.run([sys.executable, "-c", CHILD, HERE, specs, str(reps)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline checkout")
    ap.add_argument("--b", required=True, help="candidate checkout")
    ap.add_argument("--workloads", default="W1,W2,W3,W4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per subprocess (the minimum is kept)")
    args = ap.parse_args()
    specs = ",".join(f"{w}:{d}" for w in args.workloads.split(",") for d in args.dtypes.split(","))
    ratios = {s: [] for s in specs.split(",")}
    for r in range(args.rounds):
        a, b = (run(args.a, specs, args.reps), run(args.b, specs, args.reps)) if r % 2 == 0 else \
            tuple(reversed((run(args.b, specs, args.reps), run(args.a, specs, args.reps))))
        for s in ratios:
            ratios[s].append(b[s] / a[s])
        print(f"round {r + 1}/{args.rounds}: " + " ".join(f"{s}={b[s] / a[s]:.3f}" for s in ratios), flush=True)
    print("\n| workload | dtype | median time B / A | min | max |\n|---|---|---|---|---|")
    for s, v in ratios.items():
        w, d = s.split(":")
        print(f"| {w} | {d} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |")


if __name__ == "__main__":
    main()
