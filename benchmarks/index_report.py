"""One table of the index's targets (issue 12), every ratio measured in this run.

    python benchmarks/index_report.py [--out docs/benchmarks/index_report.md] [--rounds 5]
                                      [--skip quality,fast-plaid,peers,floor,fusion,batched,int8,grouped]

Cases and targets: index_workloads.py. Quality (recall@10 against exact float32 search at
(16, 64) on real MetaEmbed vectors, int8, the cascade's k1 and the test-time scaling table) runs
when benchmarks/index_data.py has cached the vectors. Times are the fastest of --rounds runs
after a warm-up (the least disturbed on a shared 2-core machine), torch's default threads; the
two sides of a ratio are timed interleaved (index_workloads.best_seconds_each), so a slow phase
of the host falls on both.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import index_workloads as W  # noqa: E402
from metaembed_kernels import DEFAULT_GROUPS, MultiVectorIndex, maxsim_grouped  # noqa: E402
from metaembed_kernels.index.storage import budget_bytes_per_candidate  # noqa: E402


def row(rows, case, measured, baseline, ratio, target, note=""):
    rows.append((case, measured, baseline, ratio, target, note))
    print(f"| {case} | {measured} | {baseline} | {ratio} | {target} | {note} |", flush=True)


def speed(rows, args, skip):
    R = args.rounds
    bw = W.bandwidth_gbs(R)
    row(rows, "memory bandwidth (torch.sum, 1 GiB)", f"{bw:.1f} GB/s", "-", "-", "-", "the floor's yardstick")
    idx = {dt: W.synthetic_index(dt) for dt in ("bfloat16", "int8")}
    q = W.queries(256)
    if "floor" not in skip:
        for dt in ("bfloat16", "int8"):
            # The search and both yardsticks interleaved (W.best_seconds_each). A slab smaller
            # than the last-level cache is read from it between searches, so DRAM's bandwidth
            # flatters the scan there; torch.sum over the same bytes does not.
            slab = W.slab_bytes(idx[dt], 1)
            (dram, dram_bytes), (same_sum, same_bytes) = W.sum_reader(), W.sum_reader(slab)
            t, t_dram, t_same = W.best_seconds_each(
                [lambda: idx[dt].search(q[:1], W.K, budget=(1, 1)), dram, same_sum], R)
            gbs, dram_gbs, same = slab / t / 1e9, dram_bytes / t_dram / 1e9, same_bytes / t_same / 1e9
            del dram, same_sum
            row(rows, f"floor: {dt} search (1, 1), Nq = 1, N = 200k", f"{t * 1e3:.2f} ms = {gbs:.1f} GB/s",
                f"{dram_gbs:.1f} GB/s", f"{gbs / dram_gbs:.2f}", ">= 0.70")
            row(rows, f"floor: {dt} search (1, 1) vs torch.sum over the slab's bytes", f"{gbs:.1f} GB/s",
                f"{same:.1f} GB/s", f"{gbs / same:.2f}", ">= 0.70", f"slab {slab / 1e6:.0f} MB")
    if "int8" not in skip:
        for budget in ((1, 1), (2, 4), (4, 8)):
            for nq in (1, 16):
                t16, t8 = W.best_seconds_each([lambda: idx["bfloat16"].search(q[:nq], W.K, budget=budget),
                                               lambda: idx["int8"].search(q[:nq], W.K, budget=budget)], R)
                row(rows, f"int8 vs bf16 search {budget}, Nq = {nq}, N = 200k", f"{t8 * 1e3:.1f} ms",
                    f"{t16 * 1e3:.1f} ms", f"{t16 / t8:.2f}x", ">= 1.6x")
        ratio = idx["int8"].nbytes / idx["bfloat16"].nbytes
        row(rows, "int8 nbytes / bf16 nbytes", f"{idx['int8'].nbytes / 1e9:.2f} GB",
            f"{idx['bfloat16'].nbytes / 1e9:.2f} GB", f"{ratio:.3f}", "<= 0.55")
    del idx
    small = {dt: W.synthetic_index(dt, W.N_SMALL) for dt in ("float32", "bfloat16", "int8")}
    if "grouped" not in skip:
        for dt in ("bfloat16", "int8"):
            qq = q[:16]
            tg, t5 = W.best_seconds_each([lambda: small[dt].search_grouped(qq, W.K, DEFAULT_GROUPS),
                                          lambda: [small[dt].search(qq, W.K, budget=g) for g in DEFAULT_GROUPS]],
                                         max(1, R // 2), burst=1)
            row(rows, f"search_grouped (5 budgets) vs 5 searches, {dt}, Nq = 16, N = 20k", f"{tg * 1e3:.0f} ms",
                f"{t5 * 1e3:.0f} ms", f"{t5 / tg:.2f}x", ">= 2x")
    if "fusion" not in skip:
        for dt, tdt in (("bfloat16", torch.bfloat16),):
            c = W.synthetic_candidates(W.N_SMALL, tdt)
            qq = q[:16].to(tdt)
            ts, tm = W.best_seconds_each([lambda: small[dt].search(qq, W.K), lambda: maxsim_grouped(qq, c)],
                                         max(1, R // 2), burst=1)
            row(rows, f"fusion: search (16, 64) {dt}, Nq = 16, N = 20k", f"{ts * 1e3:.0f} ms",
                f"{tm * 1e3:.0f} ms (maxsim_grouped)", f"{ts / tm:.2f}", "<= 1.15")
            del c
    if "batched" not in skip:
        nq = 256
        for dt, tdt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            c = W.synthetic_candidates(W.N_SMALL, tdt)
            qq = q[:nq].to(tdt)
            for budget in ((1, 1), (2, 4)):
                rq, rc = budget
                cs = c[:, :rc].contiguous()
                qs = qq[:, :rq].contiguous()
                tmm, tms, tse = W.best_seconds_each([W.matmul_same_flops(nq, rq, W.N_SMALL, rc, tdt),
                                                     lambda: maxsim_grouped(qs, cs),
                                                     lambda: small[dt].search(qq, W.K, budget=budget)], R)
                row(rows, f"batched maxsim_grouped {budget} {dt}, Nq = {nq}, N = 20k", f"{tms * 1e3:.1f} ms",
                    f"{tmm * 1e3:.1f} ms (matmul)", f"{tmm / tms:.2f}x", ">= 1.0x")
                row(rows, f"batched search {budget} {dt}, Nq = {nq}, N = 20k", f"{tse * 1e3:.1f} ms",
                    f"{tmm * 1e3:.1f} ms (matmul)", f"{tmm / tse:.2f}x", ">= 1.0x")
            del c
    if "peers" not in skip:
        try:
            c = W.synthetic_candidates(W.N_SMALL, torch.float32)
            qq = q[:4]
            fn = W.pylate_rerank_callable(qq, c)
            tp = W.best_seconds(fn, 1, warmup=0)
            ts = W.best_seconds(lambda: small["float32"].search(qq, W.K), max(1, R // 2))
            row(rows, "peer: PyLate rank.rerank (exact) vs search, (16, 64) fp32, Nq = 4, N = 20k",
                f"{4 / ts:.2f} QPS", f"{4 / tp:.2f} QPS (PyLate)", f"{tp / ts:.2f}x", "> 1x at equal recall",
                "both exact: recall@10 = 1")
        except ImportError as err:
            row(rows, "peer: PyLate rank.rerank", "-", "-", "-", "> 1x", f"not installed ({err})")


# the cascade's first-stage k1, searched smallest first
K1S = (10, 20, 50, 100, 200, 500, 1000, 2000, 3000, 4000, 5000)


def quality(rows, args):
    import index_data

    data = index_data.load()
    if data is None:
        row(rows, "quality (real MetaEmbed vectors)", "-", "-", "-", "-",
            "no cached vectors: run benchmarks/index_data.py")
        return []
    q, c = data["q"].float(), data["c"].float()
    nq, n = q.shape[0], c.shape[0]
    exact = MultiVectorIndex(c.shape[2], c.shape[1], dtype="float32")
    exact.add(c)
    truth = exact.search(q, W.K)[1]
    R = args.rounds
    scaling = []
    indexes = {}  # built once, shared by the scaling table, the cascade and the fast-plaid rows
    for dt in ("bfloat16", "int8"):
        index = indexes[dt] = MultiVectorIndex(c.shape[2], c.shape[1], dtype=dt)
        index.add(c)
        for budget in DEFAULT_GROUPS:
            ids = index.search(q, W.K, budget=budget)[1]
            t = W.best_seconds(lambda: index.search(q, W.K, budget=budget), max(1, R // 2))
            scaling.append((dt, budget, budget_bytes_per_candidate(budget[1], index.dim, dt), nq / t,
                            W.recall_at(ids, truth)))
        if dt == "int8":
            rec = W.recall_at(index.search(q, W.K)[1], truth)
            row(rows, f"int8 recall@10 at (16, 64), {n} real candidates", f"{rec:.4f}", "exact fp32", "-", ">= 0.99")
    bf16 = indexes["bfloat16"]
    t_exact = W.best_seconds(lambda: bf16.search(q, W.K), max(1, R // 2))
    chosen = None
    for k1 in K1S:
        ids = bf16.search(q, W.K, shortlist=((1, 1), k1))[1]
        rec = W.recall_at(ids, truth)
        if rec >= 0.99:
            chosen = (k1, rec)
            break
    if chosen:
        k1, rec = chosen
        t = W.best_seconds(lambda: bf16.search(q, W.K, shortlist=((1, 1), k1)), max(1, R // 2))
        row(rows, f"cascade (1, 1) -> (16, 64), bf16, {n} real candidates", f"k1 = {k1}: recall {rec:.4f}, "
            f"{t * 1e3:.0f} ms", f"{t_exact * 1e3:.0f} ms (exact)", f"{t_exact / t:.2f}x", "recall >= 0.99")
    else:
        row(rows, "cascade (1, 1) -> (16, 64)", "-", "-", "-", "recall >= 0.99", f"no k1 <= {K1S[-1]} reached 0.99")
    if "fast-plaid" not in args.skip:
        fast_plaid(rows, q[:PEER_QUERIES], c, truth[:PEER_QUERIES], indexes, args)
    return scaling


# The PLAID peer's queries: fast-plaid runs ~1-30 QPS on 2 cores here
PEER_QUERIES = 100


def fast_plaid(rows, q, c, truth, indexes, args):
    """fast-plaid (CPU, its own venv: benchmarks/fast_plaid_peer.py) against our fastest
    configuration (of `indexes`, built over c) that reaches at least its recall@10, on the same
    vectors and queries."""
    import json
    import subprocess
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = subprocess.run(["bash", os.path.join(repo, "scripts", "fast_plaid_venv.sh")], capture_output=True,
                          text=True)
    if venv.returncode != 0:
        row(rows, "peer: fast-plaid (CPU)", "-", "-", "-", "> 1x at equal recall",
            "its venv failed: " + (venv.stderr.strip().splitlines() or ["?"])[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dict(q=q.half(), c=c.half()), os.path.join(tmp, "data.pt"))  # the vectors are fp16
        out = os.path.join(tmp, "out.json")
        run = subprocess.run([venv.stdout.strip().splitlines()[-1], os.path.join(repo, "benchmarks", "fast_plaid_peer.py"),
                              os.path.join(tmp, "data.pt"), out], capture_output=True, text=True)
        if run.returncode != 0:
            row(rows, "peer: fast-plaid (CPU)", "-", "-", "-", "> 1x at equal recall",
                "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1])
            return
        peer = json.load(open(out))
    # ours: every budget, and cascades into (16, 64), bf16 and int8, on the same queries
    ours = []
    for dt, index in indexes.items():
        configs = [dict(budget=b) for b in DEFAULT_GROUPS]
        configs += [dict(shortlist=(first, k1)) for first in ((4, 8), (8, 16)) for k1 in (50, 100, 200, 500)]
        for config in configs:
            recall = W.recall_at(index.search(q, W.K, **config)[1], truth)
            t = W.best_seconds(lambda: index.search(q, W.K, **config), max(1, args.rounds // 2))
            ours.append((q.shape[0] / t, recall, f"{dt} " + (f"{config['budget']}" if "budget" in config else
                                                              f"{config['shortlist'][0]} -> (16, 64), k1 = "
                                                              f"{config['shortlist'][1]}")))
    for s in peer["settings"]:
        recall = W.recall_at(torch.tensor(s["ids"]), truth)
        reach = [o for o in ours if o[1] >= recall]
        qps, our_recall, name = max(reach) if reach else (0.0, 0.0, "none reaches it")
        row(rows, f"peer: fast-plaid {peer['fast_plaid']} (CPU, 4-bit, n_ivf_probe = {s['n_ivf_probe']}, "
            f"n_full_scores = {s['n_full_scores']}), Nq = {q.shape[0]}, N = {c.shape[0] // 1000}k real",
            f"{qps:.1f} QPS, recall {our_recall:.3f} ({name})", f"{s['qps']:.1f} QPS, recall {recall:.3f}",
            f"{qps / s['qps']:.2f}x", "> 1x at equal recall",
            f"its build {peer['build_seconds']:.0f} s (k-means on {peer['kmeans_docs']} docs), "
            f"{peer['index_bytes'] / c.shape[0]:,.0f} bytes / candidate on disk")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "docs", "benchmarks", "index_report.md"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", default="")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    rows = []
    print("| case | measured | baseline (same run) | ratio | target | note |\n|---|---|---|---|---|---|")
    scaling = [] if "quality" in skip else quality(rows, args)
    speed(rows, args, skip)
    lines = [f"# Index benchmark report\n\n`python benchmarks/index_report.py --rounds {args.rounds}"
             + (f" --skip {args.skip}" if args.skip else "") + f"` ({torch.get_num_threads()} threads, "
             f"{time.perf_counter() - start:.0f} s)\n",
             "| case | measured | baseline (same run) | ratio | target | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    if scaling:
        lines += ["", "## Test-time scaling (real MetaEmbed vectors, recall@10 against exact float32 at (16, 64))",
                  "", "| index | budget | bytes / candidate | QPS | recall@10 |", "|---|---|---|---|---|"]
        lines += [f"| {dt} | {b} | {nb:,} | {qps:.1f} | {rec:.3f} |" for dt, b, nb, qps, rec in scaling]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
