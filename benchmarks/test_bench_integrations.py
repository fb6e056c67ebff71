"""Host losses, native vs on our kernels: forward + backward on given embeddings (encoder excluded)
and peak working memory, measured in one run inside each host's own environment.

    bash scripts/test_integrations.sh --bench            # every host, then the table below
    python benchmarks/test_bench_integrations.py --report .benchmarks/integrations/*.json

Shape (issue 11): 32 queries x 32 tokens; 32 documents x 180 tokens plus 1 hard negative each;
D = 128; float32 and bfloat16. Each case runs the host's own loss class:

* pylate: ``pylate.losses.Contrastive`` (skiplist masks), default score metric vs ``ColBERTScores()``;
* colpali: ``ColbertNegativeCELoss`` (in-batch term + the negative) unpatched vs ``patch()``, and
  MetaEmbed's Matryoshka loss (5 groups), the released maths (one 4-D einsum sliced per group) vs
  ``MatryoshkaColbertLoss``;
* sentence_transformers: ``MultiVectorMultipleNegativesRankingLoss``, default vs ``MaxSim()``.

A stub encoder hands the loss leaf embeddings. Time: native and ours alternate within each round
(other jobs share the cores); the speed-up is the ratio of the best rounds, medians recorded too.
Memory: the peak RSS a second forward + backward adds over the RSS just before it, in a fresh
process (as benchmarks/workloads.py measures it). PyLate's and ST's losses also allocate on their
own (normalised copies, stacked documents, their gradients): "host's own MiB" is that floor,
measured with a scorer that has no working memory and only returns the dense input gradients
that every scorer must return; the last column is what ours adds above it (RSS noise: about
+-1 MiB).
The module runs only where METAEMBED_HOST names a host (scripts/test_integrations.sh sets it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

HOST = os.environ.get("METAEMBED_HOST")
NQ, LQ, LD, D = 32, 32, 180, 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# the cases: build(dtype, provider) -> fn() doing one forward + backward
# ---------------------------------------------------------------------------------------------
def _embeddings(dtype, sign=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(NQ, LQ, D, generator=g), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(NQ, LD, D, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(NQ, LD, D, generator=g), dim=-1)
    lengths = torch.randint(LD // 2, LD + 1, (2, NQ), generator=g)
    keep = torch.arange(LD)[None, None, :] < lengths[..., None]  # right padding of the documents
    return [x.to(dtype) for x in (q, pos, neg)], keep


class _DenseGradientSums(torch.autograd.Function):
    """fp32 sums over the last two dims (no copy of the input) whose backward hands back a dense
    gradient of the input's shape and dtype, as every scorer must."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.sum((-2, -1), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        return torch.empty(ctx.shape, dtype=ctx.dtype).copy_(g[..., None, None].expand(ctx.shape))


def floor_scorer(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None, **kw):
    """The least any scorer can cost: no working memory of its own, only the dense input gradients
    it must return. The host loss around it measures the host's own allocations (normalisation,
    stacking, their gradients) plus those gradients. Shape (Q, Qd * N) as the in-batch scorers
    return."""
    q_sum = _DenseGradientSums.apply(queries_embeddings)
    d_sum = _DenseGradientSums.apply(documents_embeddings).reshape(1, -1)
    return q_sum[:, None] * d_sum


def _fwd_bwd(loss_call, leaves, before=None):
    """fn() = one forward + backward; fn.before() (untimed) sets up global state such as a patch."""
    def fn():
        for x in leaves:
            x.grad = None
        loss_call().backward()

    fn.before = before or (lambda: None)
    return fn


def pylate_contrastive(dtype, provider):
    import pylate.losses

    from metaembed_kernels.integrations import pylate as me

    (q, pos, neg), keep = _embeddings(dtype)

    class Stub(torch.nn.Module):
        skiplist = [7]
        do_query_expansion = False

        def forward(self, features):
            return {"token_embeddings": features["token_embeddings"]}

    g = torch.Generator().manual_seed(1)
    leaves, feats = [], []
    for i, x in enumerate((q, pos, neg)):
        x = x.clone().requires_grad_(True)
        ids = torch.randint(5, 30, x.shape[:2], generator=g)
        mask = torch.ones(x.shape[:2], dtype=torch.long) if i == 0 else keep[i - 1].long()
        leaves.append(x)
        feats.append({"input_ids": ids, "attention_mask": mask, "token_embeddings": x})
    metric = {"adapted": me.ColBERTScores(), "native": None, "floor": floor_scorer}[provider]
    loss = pylate.losses.Contrastive(Stub(), score_metric=metric)
    return _fwd_bwd(lambda: loss(feats), leaves)


def _colpali_inputs(dtype):
    (q, pos, neg), keep = _embeddings(dtype)
    pos = pos * keep[0][..., None].to(dtype)  # colpali's zero padding
    neg = (neg * keep[1][..., None].to(dtype)).unsqueeze(1)  # (B, 1, L, D)
    return [x.clone().requires_grad_(True) for x in (q, pos, neg)]


def colpali_negative_ce(dtype, provider):
    import colpali_engine.loss as closs

    from metaembed_kernels.integrations import colpali as me

    leaves = _colpali_inputs(dtype)
    loss = closs.ColbertNegativeCELoss(normalize_scores=False)
    return _fwd_bwd(lambda: loss(*leaves), leaves, before=me.patch if provider == "adapted" else me.unpatch)


def released_matryoshka_loss(q, c, neg, groups, temperature):
    """MetaEmbed's released loss maths (read, not copied): one 4-D einsum at the top budget, sliced
    per group; in-batch logits then each query's own negatives; CE; sum w L_g / G."""
    raw = torch.einsum("bnd,csd->bcns", q, c)
    raw_neg = torch.einsum("bnd,bksd->bkns", q, neg)
    labels = torch.arange(q.shape[0])
    total = 0.0
    for r_q, r_c, w in groups:
        logits = torch.cat([raw[:, :, :r_q, :r_c].amax(-1).sum(-1), raw_neg[:, :, :r_q, :r_c].amax(-1).sum(-1)], 1)
        total = total + w * torch.nn.functional.cross_entropy(logits.float() / temperature, labels)
    return total / len(groups)


def colpali_matryoshka(dtype, provider):
    from metaembed_kernels.integrations import colpali as me

    leaves = _colpali_inputs(dtype)
    if provider == "adapted":
        loss = me.MatryoshkaColbertLoss()
        return _fwd_bwd(lambda: loss(*leaves), leaves)
    return _fwd_bwd(lambda: released_matryoshka_loss(*leaves, me.METAEMBED_MRL_GROUPS, 0.03), leaves)


def st_mnrl(dtype, provider):
    from sentence_transformers.multi_vector_encoder.losses import MultiVectorMultipleNegativesRankingLoss

    from metaembed_kernels.integrations import sentence_transformers as me

    (q, pos, neg), keep = _embeddings(dtype)
    # One leaf table holds every token; input_ids index its rows, so ST's column merging sees
    # ordinary token batches and the stub's lookup costs the same on both paths.
    table = torch.cat([x.reshape(-1, D) for x in (q, pos, neg)]).requires_grad_(True)
    masks = [torch.ones(NQ, LQ, dtype=torch.long), keep[0].long(), keep[1].long()]
    offsets = [0, NQ * LQ, NQ * LQ + NQ * LD]
    feats = [{"input_ids": torch.arange(n).view(m.shape) + o, "attention_mask": m}
             for n, m, o in zip((NQ * LQ, NQ * LD, NQ * LD), masks, offsets)]
    leaves = [table]

    class Stub(torch.nn.Module):
        def forward(self, features, task=None, **kwargs):
            return {"token_embeddings": table[features["input_ids"]], "attention_mask": features["attention_mask"]}

    metric = {"adapted": me.MaxSim(), "native": None, "floor": floor_scorer}[provider]
    loss = MultiVectorMultipleNegativesRankingLoss(Stub(), scale=20.0, similarity_fct=metric)
    return _fwd_bwd(lambda: loss(feats), leaves)


CASES = {
    "pylate": {"Contrastive": pylate_contrastive},
    "colpali": {"ColbertNegativeCELoss": colpali_negative_ce, "MetaEmbed Matryoshka (5 groups)": colpali_matryoshka},
    "sentence_transformers": {"MultiVectorMultipleNegativesRankingLoss": st_mnrl},
}


# ---------------------------------------------------------------------------------------------
# memory probe (fresh process)
# ---------------------------------------------------------------------------------------------
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _probe(host, case, dtype, provider):
    fn = CASES[host][case](DTYPES[dtype], provider)
    fn.before()
    fn()  # first call: lazy initialisation is not working memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kb("VmRSS")
    fn()
    print((_rss_kb("VmHWM") - before) / 1024.0)


def peak_extra_memory_mb(host, case, dtype, provider) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", host, case, dtype, provider],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------------
if "pytest" in sys.modules:
    import statistics
    import time

    import pytest

    PARAMS = [(h, c, dt) for h in CASES for c in CASES[h] for dt in DTYPES]

    @pytest.mark.parametrize("host,case,dtype", PARAMS, ids=["-".join(x) for x in PARAMS])
    def test_host_loss(benchmark, host, case, dtype):
        """One pytest-benchmark round = native then ours, so that both see the same machine load.
        Other jobs share these cores, so the speed-up is the ratio of the best rounds (the least
        disturbed ones); the medians are recorded too."""
        if HOST != host:
            pytest.skip(f"runs in the {host} environment: scripts/test_integrations.sh --bench {host}")
        fns = {p: CASES[host][case](DTYPES[dtype], p) for p in ("native", "adapted")}
        times = {p: [] for p in fns}

        def pair():
            for p, fn in fns.items():
                fn.before()
                t0 = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t0)

        benchmark.pedantic(pair, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        best = {p: min(t[1:]) for p, t in times.items()}  # t[0]: the warm-up round
        median = {p: statistics.median(t[1:]) for p, t in times.items()}
        benchmark.extra_info.update(
            host=host, case=case, dtype=dtype, threads=torch.get_num_threads(),
            native_ms=1e3 * best["native"], adapted_ms=1e3 * best["adapted"],
            native_median_ms=1e3 * median["native"], adapted_median_ms=1e3 * median["adapted"],
            native_mb=peak_extra_memory_mb(host, case, dtype, "native"),
            adapted_mb=peak_extra_memory_mb(host, case, dtype, "adapted"),
            # the host loss's own allocations, paid by any scorer (0: the loss takes embeddings as given)
            host_floor_mb=peak_extra_memory_mb(host, case, dtype, "floor") if host != "colpali" else 0.0,
        )


ROUNDS = int(os.environ.get("METAEMBED_BENCH_ROUNDS", "9"))


# ---------------------------------------------------------------------------------------------
# report: python benchmarks/test_bench_integrations.py --report a.json b.json ...
# ---------------------------------------------------------------------------------------------
def report(paths) -> str:
    lines = ["| host | loss (fwd + bwd) | dtype | native ms | ours ms | speed-up (best) | speed-up (median) "
             "| native MiB | ours MiB | memory ratio | host's own MiB | ours above host's own MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [b["extra_info"] for b in json.load(f)["benchmarks"]]
    for r in sorted(rows, key=lambda r: (r["host"], r["case"], r["dtype"])):
        lines.append(
            f"| {r['host']} | {r['case']} | {r['dtype']} | {r['native_ms']:.1f} | {r['adapted_ms']:.1f} "
            f"| {r['native_ms'] / r['adapted_ms']:.1f}x | {r['native_median_ms'] / r['adapted_median_ms']:.1f}x "
            f"| {r['native_mb']:.1f} | {r['adapted_mb']:.1f} | {r['native_mb'] / max(r['adapted_mb'], 0.1):.1f}x "
            f"| {r['host_floor_mb']:.1f} | {r['adapted_mb'] - r['host_floor_mb']:+.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        _probe(*sys.argv[2:6])
    elif sys.argv[1:2] == ["--report"]:
        print(report(sys.argv[2:]))
    else:
        sys.exit("usage: --report FILE.json ... | --probe HOST CASE DTYPE PROVIDER")
