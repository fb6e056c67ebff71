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

A stub encoder hands the loss leaf embeddings. Memory: the peak RSS a second forward + backward
adds over the RSS just before it, in a fresh process (as benchmarks/workloads.py measures it).
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


def _fwd_bwd(loss_call, leaves):
    def fn():
        for x in leaves:
            x.grad = None
        loss_call().backward()

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
    metric = me.ColBERTScores() if provider == "adapted" else None
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
    if provider == "adapted":
        me.patch()
    else:
        me.unpatch()
    return _fwd_bwd(lambda: loss(*leaves), leaves)


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

    loss = MultiVectorMultipleNegativesRankingLoss(Stub(), scale=20.0,
                                                   similarity_fct=me.MaxSim() if provider == "adapted" else None)
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
    import pytest

    PARAMS = [(h, c, dt, p) for h in CASES for c in CASES[h] for dt in DTYPES for p in ("native", "adapted")]

    @pytest.mark.parametrize("host,case,dtype,provider", PARAMS, ids=["-".join(x) for x in PARAMS])
    def test_host_loss(benchmark, host, case, dtype, provider):
        if HOST != host:
            pytest.skip(f"runs in the {host} environment: scripts/test_integrations.sh --bench {host}")
        fn = CASES[host][case](DTYPES[dtype], provider)
        benchmark.extra_info.update(host=host, case=case, dtype=dtype, provider=provider,
                                    peak_extra_memory_mb=peak_extra_memory_mb(host, case, dtype, provider))
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


# ---------------------------------------------------------------------------------------------
# report: python benchmarks/test_bench_integrations.py --report a.json b.json ...
# ---------------------------------------------------------------------------------------------
def report(paths) -> str:
    rows = {}
    for path in paths:
        with open(path) as f:
            for b in json.load(f)["benchmarks"]:
                info = b["extra_info"]
                key = (info["host"], info["case"], info["dtype"])
                rows.setdefault(key, {})[info["provider"]] = (b["stats"]["median"], info["peak_extra_memory_mb"])
    lines = ["| host | loss (fwd + bwd) | dtype | native ms | ours ms | speed-up | native MiB | ours MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (host, case, dtype), r in sorted(rows.items()):
        if "native" not in r or "adapted" not in r:
            continue
        (tn, mn), (ta, ma) = r["native"], r["adapted"]
        lines.append(f"| {host} | {case} | {dtype} | {tn * 1e3:.1f} | {ta * 1e3:.1f} | {tn / ta:.1f}x "
                     f"| {mn:.1f} | {ma:.1f} | {mn / max(ma, 0.1):.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        _probe(*sys.argv[2:6])
    elif sys.argv[1:2] == ["--report"]:
        print(report(sys.argv[2:]))
    else:
        sys.exit("usage: --report FILE.json ... | --probe HOST CASE DTYPE PROVIDER")
