"""fast-plaid on the CPU, on the index report's real vectors (issue 12's PLAID peer).

Runs in fast-plaid's own venv (it pins torch==2.11.0, this project's bench venv has another
torch): scripts/fast_plaid_venv.sh makes it, benchmarks/index_report.py calls this script
there and turns the ids into recall@10 against its exact search. It imports nothing of
metaembed-kernels.

    python benchmarks/fast_plaid_peer.py DATA.pt OUT.json [--rounds 1] [--kmeans-docs 2000]

DATA.pt holds {"q": (Nq, Rq, D), "c": (N, Rc, D)} float tensors. OUT.json gets the build time,
the index's bytes on disk and, per search setting (n_ivf_probe, n_full_scores), the top-10 ids
of every query and the fastest of --rounds timed passes over all queries (after a warm-up on
the first 4 queries). The index is fast-plaid's defaults (4-bit residuals, its own number of
centroids) but for the k-means sample: --kmeans-docs documents (`create(n_samples_kmeans=)`;
its default samples every document of a 20k corpus, 1.28M vectors into 16,384 centroids,
which takes longer on 2 cores than the whole rest of the report).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

# (n_ivf_probe, n_full_scores): fast-plaid's default (8, 4096) and a cheaper and a
# costlier point around it, so the report can compare at the recall each one reaches
SETTINGS = ((4, 1024), (8, 4096), (32, 8192))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kmeans-docs", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    from fast_plaid import search as fp_search

    data = torch.load(args.data)
    q, c = data["q"].float(), data["c"].float()
    result = dict(fast_plaid=_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                  num_candidates=c.shape[0], kmeans_docs=args.kmeans_docs, settings=[])
    with tempfile.TemporaryDirectory() as tmp:
        index = fp_search.FastPlaid(index=os.path.join(tmp, "plaid"), device="cpu")
        start = time.perf_counter()
        index.create(documents_embeddings=[c[i] for i in range(c.shape[0])], n_samples_kmeans=args.kmeans_docs)
        result["build_seconds"] = time.perf_counter() - start
        result["index_bytes"] = sum(os.path.getsize(os.path.join(root, f))
                                    for root, _, files in os.walk(os.path.join(tmp, "plaid")) for f in files)
        for probe, full in SETTINGS:
            def run(queries):
                return index.search(queries_embeddings=queries, top_k=args.k, n_ivf_probe=probe,
                                    n_full_scores=full, show_progress=False)
            run(q[:4])  # warm-up
            best, hits = min((_timed(run, q) for _ in range(args.rounds)), key=lambda timed: timed[0])
            result["settings"].append(dict(n_ivf_probe=probe, n_full_scores=full, seconds=best,
                                           qps=q.shape[0] / best,
                                           ids=[[int(i) for i, _ in row] for row in hits]))
            print(f"fast-plaid n_ivf_probe={probe} n_full_scores={full}: {q.shape[0] / best:.1f} QPS", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _version() -> str:
    from importlib.metadata import version

    return version("fast-plaid")


if __name__ == "__main__":
    main()
