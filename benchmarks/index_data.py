"""Real MetaEmbed vectors for the index quality benchmarks, cached on disk (outside git).

    python examples/train_text_retrieval.py --save ~/.cache/metaembed-kernels/index_bench/model
    python benchmarks/index_data.py [--candidates 20000] [--queries 500]

Model: the example's trained MetaEmbed (all-MiniLM-L6-v2 with Rq = 16, Rc = 64 meta tokens,
D = 384), loaded with MetaEmbed.from_pretrained from the directory the example's --save wrote.

Candidates (>= 20,000): the example's docstring pool (first sentence -> rest of docstring, Python
standard library and torch) plus distractor docstrings from other installed packages
(site-packages: numpy, transformers, sympy, ...), deduplicated, in a fixed order. Queries: the
first sentences of pool docstrings (their positives are in the pool). Recall in the benchmarks is
measured against exact float32 search at (16, 64), so labels are not needed; they are kept for
reference.

Encoding is the slow part (a 6-layer encoder over ~110 positions per text, 80 of them meta
tokens): it runs in shards of 1,000 texts, each saved as soon as it is done, so an interrupted
run resumes where it stopped. Vectors are stored as float16 (the index converts them).
Cache: $METAEMBED_INDEX_BENCH (default ~/.cache/metaembed-kernels/index_bench).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

import torch

CACHE = os.environ.get("METAEMBED_INDEX_BENCH", os.path.expanduser("~/.cache/metaembed-kernels/index_bench"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 1000
DISTRACTOR_PACKAGES = ("numpy", "transformers", "sympy", "tqdm", "huggingface_hub", "safetensors", "peft",
                       "tokenizers", "jinja2", "networkx", "mpmath", "pygments", "filelock", "fsspec", "triton",
                       "pytest", "pluggy", "packaging", "yaml", "regex", "sentence_transformers", "_pytest")


def _example():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_text_retrieval as ex

    return ex


def texts(num_candidates: int, num_queries: int):
    """(candidate texts, query texts, positive index of each query) in a fixed order."""
    ex = _example()
    import site

    train, test = ex.build_dataset(include_torch=True)
    pool = train + test
    seen, candidates, queries, positives = set(), [], [], []
    for p in pool:
        if p.candidate not in seen:
            seen.add(p.candidate)
            candidates.append(p.candidate)
    # queries: every 7th pool pair, by a hash of its source (spread over files), up to num_queries
    for p in pool:
        if len(queries) >= num_queries:
            break
        if zlib.crc32(p.query.encode()) % 7 == 0:
            queries.append(p.query)
            positives.append(candidates.index(p.candidate))
    roots = [d for d in site.getsitepackages() if os.path.isdir(d)]
    for package in DISTRACTOR_PACKAGES:
        if len(candidates) >= num_candidates:
            break
        for root in roots:
            path = os.path.join(root, package)
            if not os.path.isdir(path):
                continue
            for p in ex.docstring_pairs(path, package):
                if p.candidate not in seen:
                    seen.add(p.candidate)
                    candidates.append(p.candidate)
    if len(candidates) < num_candidates:
        raise SystemExit(f"only {len(candidates)} distinct docstrings found, {num_candidates} wanted")
    return candidates[:num_candidates], queries, positives


def encode_all(model, tokenizer, items, role: str, out_dir: str, max_length: int) -> torch.Tensor:
    os.makedirs(out_dir, exist_ok=True)
    ex = _example()
    parts = []
    for start in range(0, len(items), SHARD):
        path = os.path.join(out_dir, f"{role}_{start:07d}.pt")
        if not os.path.exists(path):
            t = time.perf_counter()
            vectors = ex.encode(model, tokenizer, items[start: start + SHARD], role, max_length, 64)
            tmp = path + ".tmp"
            torch.save(vectors.to(torch.float16), tmp)
            os.replace(tmp, path)
            print(f"{role} {start + len(items[start: start + SHARD])}/{len(items)} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        parts.append(torch.load(path))
    return torch.cat(parts)


def load(num_candidates: int = 20000, num_queries: int = 500):
    """(q (Nq, 16, D) float16, c (Nc, 64, D) float16, positives) from the cache, or None."""
    path = os.path.join(CACHE, f"vectors_{num_candidates}_{num_queries}.pt")
    return torch.load(path) if os.path.exists(path) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--model", default=os.path.join(CACHE, "model"))
    args = parser.parse_args(argv)
    out = os.path.join(CACHE, f"vectors_{args.candidates}_{args.queries}.pt")
    if os.path.exists(out):
        print("cached:", out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from metaembed_kernels import MetaEmbed

    ex = _example()
    tokenizer, _ = ex.load_minilm()
    model = MetaEmbed.from_pretrained(args.model)
    candidates, queries, positives = texts(args.candidates, args.queries)
    print(f"{len(candidates)} candidates, {len(queries)} queries", flush=True)
    shards = os.path.join(CACHE, f"shards_{args.candidates}_{args.queries}")
    q = encode_all(model, tokenizer, queries, "query", shards, 32)
    c = encode_all(model, tokenizer, candidates, "candidate", shards, 64)
    torch.save({"q": q, "c": c, "positives": torch.tensor(positives)}, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
