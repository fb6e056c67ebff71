"""metaembed_kernels.integrations.colpali inside colpali-engine 0.3.18 (its own environment:
scripts/test_integrations.sh colpali). Parity with colpali's einsum MaxSim, its four ColBERT losses
patched vs not, MatryoshkaColbertLoss against the released loss's maths, one training step of a
tiny random Qwen2-VL (ColQwen2) in colpali's ContrastiveTrainer, and patch()/unpatch()."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import hostlib
from hostlib import DTYPES, assert_close_rel, leaf, unit

hostlib.require_host("colpali", {"colpali-engine": "0.3.18"})

import colpali_engine.loss as closs  # noqa: E402
import colpali_engine.loss.late_interaction_losses as li  # noqa: E402
from colpali_engine.utils import maxsim as host  # noqa: E402
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor  # noqa: E402

from metaembed_kernels.integrations import colpali as me  # noqa: E402

D = 128


def tol(dtype):
    """colpali's own tolerance for a MaxSim backend (tests/utils/test_maxsim.py: atol 1e-4 in fp32,
    2e-2 in half precision), plus, in half precision, two units in the last place of the output:
    both sides round their result to the input dtype."""
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-5)
    return dict(atol=2e-2, rtol=2 * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11))


@pytest.fixture(autouse=True)
def _unpatched():
    me.unpatch()
    yield
    me.unpatch()


def zero_padded(n, length, dtype, generator, sign=0, min_len=1):
    """Normalised embeddings multiplied by a right-padding attention mask (as colpali's models do)."""
    x = unit(n, length, D, dtype=dtype, sign=sign, generator=generator)
    lengths = torch.randint(min_len, length + 1, (n,), generator=generator)
    lengths[0] = length
    keep = torch.arange(length)[None, :] < lengths[:, None]
    return x * keep[..., None].to(dtype)


CASES = ("mixed", "all_negative", "all_zero_doc")


def case_inputs(case, dtype, seed=0, nq=5, nd=6, lq=24, ld=40):
    g = torch.Generator().manual_seed(seed)
    neg = case != "mixed"
    q = zero_padded(nq, lq, dtype, g, sign=1 if neg else 0)
    d = zero_padded(nd, ld, dtype, g, sign=-1 if neg else 0)
    if case == "all_zero_doc":
        d[2] = 0
    return q, d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_maxsim_inbatch_parity(case, dtype):
    q, d = case_inputs(case, dtype)
    want = host._torch_maxsim(q, d)
    got = me.maxsim_inbatch(q, d)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_maxsim_kd_parity(case, dtype):
    q, _ = case_inputs(case, dtype, seed=1, nq=4)
    g = torch.Generator().manual_seed(2)
    d = zero_padded(4 * 3, 40, dtype, g, sign=-1 if case != "mixed" else 0).view(4, 3, 40, D)
    if case == "all_zero_doc":
        d[1, 2] = 0
    want = host._torch_maxsim_kd(q, d)
    got = me.maxsim_kd(q, d)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", (0, -1), ids=("mixed", "all_negative"))
def test_score_multi_vector_ragged_lists(dtype, sign):
    g = torch.Generator().manual_seed(3)
    qs = [unit(lq, D, dtype=dtype, sign=-sign, generator=g) for lq in (3, 20, 9)]
    ps = [unit(lp, D, dtype=dtype, sign=sign, generator=g) for lp in (40, 7, 33, 12, 5)]
    for batch_size in (2, 128):
        want = BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, batch_size=batch_size, device="cpu")
        got = me.score_multi_vector(qs, ps, batch_size=batch_size, device="cpu")
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, **tol(dtype))
    if sign:
        # The case discriminates: colpali pads passages per chunk, and a zero pad wins the max of
        # an all-negative row, so chunks of 2 and one chunk of 5 give different scores.
        chunked = me.score_multi_vector(qs, ps, batch_size=2, device="cpu")
        whole = me.score_multi_vector(qs, ps, batch_size=128, device="cpu")
        assert (chunked - whole).abs().max() > 0.1
    with pytest.raises(ValueError, match="No queries"):
        me.score_multi_vector([], ps)


# ---------------------------------------------------------------------------------------------
# colpali's losses, patched vs not
# ---------------------------------------------------------------------------------------------
def loss_inputs(seed, b=6, k=2, lq=16, ld=30, sign=0):
    g = torch.Generator().manual_seed(seed)
    q = zero_padded(b, lq, torch.float32, g, sign=-sign, min_len=4)
    d = zero_padded(b, ld, torch.float32, g, sign=sign, min_len=4)
    n = zero_padded(b * k, ld, torch.float32, g, sign=sign, min_len=4).view(b, k, ld, D)
    return q, d, n


def run(loss_fn, tensors):
    leaves = [leaf(t) for t in tensors]
    value = loss_fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


def compare(native, adapted, tensors=None):
    """Loss and gradients to 1e-5 relative. With ``tensors``, gradients are compared on real
    tokens only: a zero pad ties with every other zero similarity, and colpali's ``amax`` splits
    the gradient evenly between tied tokens where we give it to the lowest index. colpali's
    models multiply pads by the attention mask, so no pad gradient reaches the weights (the
    training-step test checks the update)."""
    (l0, g0), (l1, g1) = native, adapted
    assert_close_rel(l1, l0, 1e-5, "loss")
    for i, (a, b) in enumerate(zip(g1, g0)):
        if tensors is not None:
            real = tensors[i].ne(0).any(-1, keepdim=True)
            a, b = a * real, b * real
        assert_close_rel(a, b, 1e-5, f"gradient of input {i}")


LOSSES = [
    ("ColbertLoss", dict(), False),
    ("ColbertLoss", dict(pos_aware_negative_filtering=True, normalize_scores=False), False),
    ("ColbertPairwiseCELoss", dict(), False),
    ("ColbertNegativeCELoss", dict(), True),
    ("ColbertNegativeCELoss", dict(in_batch_term_weight=0.0), True),
    ("ColbertPairwiseNegativeCELoss", dict(), True),
]


@pytest.mark.parametrize("sign", (0, -1), ids=("mixed", "all_negative_docs"))
@pytest.mark.parametrize("name,kw,with_negatives", LOSSES, ids=lambda x: x if isinstance(x, str) else "")
def test_losses_patched_vs_native(name, kw, with_negatives, sign):
    q, d, n = loss_inputs(4, sign=sign)
    tensors = (q, d, n) if with_negatives else (q, d)
    loss_fn = getattr(closs, name)(**kw)
    native = run(loss_fn, tensors)
    me.patch()
    with mock.patch.object(me._common, "score", wraps=me._common.score) as in_batch, \
            mock.patch.object(me._common, "score_paired", wraps=me._common.score_paired) as paired:
        adapted = run(loss_fn, tensors)
    assert in_batch.call_count + paired.call_count >= 1, "the patched loss did not reach our kernel"
    compare(native, adapted, tensors)


@pytest.mark.parametrize("name,kw,with_negatives", LOSSES[::2], ids=lambda x: x if isinstance(x, str) else "")
def test_smooth_max_keeps_colpali_path(name, kw, with_negatives):
    q, d, n = loss_inputs(5)
    tensors = (q, d, n) if with_negatives else (q, d)
    loss_fn = getattr(closs, name)(use_smooth_max=True, **kw)
    native = run(loss_fn, tensors)
    me.patch()
    with mock.patch.object(me._common, "score") as in_batch, mock.patch.object(me._common, "score_paired") as paired:
        patched = run(loss_fn, tensors)
    assert in_batch.call_count == paired.call_count == 0
    torch.testing.assert_close(patched[0], native[0], rtol=0, atol=0)
    for a, b in zip(patched[1], native[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# MatryoshkaColbertLoss against the released loss's maths
# ---------------------------------------------------------------------------------------------
class ReleasedStyleLoss(torch.nn.Module):
    """The maths of MetaEmbed's released ColbertInBatchNegativeLoss (read, not copied): one 4-D
    einsum at the top budget, sliced per group; logits = in-batch scores, then each query's own
    negatives; / temperature; cross-entropy against arange + offset; sum w_g L_g / G."""

    def __init__(self, mrl_groups, temperature):
        super().__init__()
        self.mrl_groups, self.temperature = mrl_groups, temperature

    def forward(self, query_embeddings, doc_embeddings, neg_doc_embeddings=None, offset=0):
        q, c, n = query_embeddings, doc_embeddings, neg_doc_embeddings
        raw = torch.einsum("bnd,csd->bcns", q, c)
        raw_neg = None if n is None else torch.einsum("bnd,bksd->bkns", q, n if n.dim() == 4 else n[:, None])
        labels = torch.arange(q.shape[0]) + offset
        total = 0.0
        for r_q, r_c, w in self.mrl_groups:
            logits = raw[:, :, :r_q, :r_c].amax(-1).sum(-1)
            if raw_neg is not None:
                logits = torch.cat([logits, raw_neg[:, :, :r_q, :r_c].amax(-1).sum(-1)], dim=1)
            total = total + w * F.cross_entropy(logits / self.temperature, labels)
        return total / len(self.mrl_groups)


@pytest.mark.parametrize("variant", ("default_groups", "offset_and_weights", "one_negative_3d", "no_negatives"))
def test_matryoshka_colbert_loss(variant):
    g = torch.Generator().manual_seed(6)
    groups = me.METAEMBED_MRL_GROUPS
    b, bd, k, offset = 6, 6, 2, 0
    if variant == "offset_and_weights":
        groups, bd, offset = ((1, 1, 0.5), (3, 5, 2.0), (16, 64, 1.0)), 12, 5
    q = unit(b, 16, D, generator=g)
    c = zero_padded(bd, 70, torch.float32, g, min_len=64)
    n = unit(b, k, 70, D, generator=g)
    if variant == "one_negative_3d":
        n = n[:, 0]
    if variant == "no_negatives":
        n = None
    tensors = [x for x in (q, c, n) if x is not None]
    ref = ReleasedStyleLoss(groups, 0.03)
    ours = me.MatryoshkaColbertLoss(groups, temperature=0.03)

    def call(fn):
        leaves = [leaf(t) for t in tensors]
        args = leaves + [None] * (3 - len(leaves))
        value = fn(*args, offset=offset)
        value.backward()
        return value.detach(), [x.grad for x in leaves]

    compare(call(ref), call(ours))
    assert ours.group_losses.shape == (len(groups),)


def test_matryoshka_colbert_loss_negatives_of_another_length():
    g = torch.Generator().manual_seed(7)
    groups = ((2, 4, 1.0), (8, 40, 1.0))
    q, c, n = unit(4, 8, D, generator=g), unit(4, 40, D, generator=g), unit(4, 3, 25, D, generator=g)
    want = ReleasedStyleLoss(groups, 0.05)(q, c, n)
    torch.testing.assert_close(me.MatryoshkaColbertLoss(groups, 0.05)(q, c, n), want, rtol=1e-5, atol=1e-6)


def test_matryoshka_colbert_loss_bad_inputs():
    with pytest.raises(ValueError, match="mrl_groups"):
        me.MatryoshkaColbertLoss(((1, 1),))
    loss = me.MatryoshkaColbertLoss(((1, 1, 1.0),))
    with pytest.raises(ValueError, match="neg_doc_embeddings"):
        loss(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(3, 1, 4, 8))


# ---------------------------------------------------------------------------------------------
# one real optimizer step: tiny random Qwen2-VL (ColQwen2) in colpali's ContrastiveTrainer
# ---------------------------------------------------------------------------------------------
def tiny_colqwen2():
    from colpali_engine.models import ColQwen2
    from transformers import Qwen2VLConfig

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=1, in_channels=3),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )
    config._attn_implementation = "eager"  # sdpa gives NaN states at left pads (fully masked rows)
    return ColQwen2(config)


class TokenPairs(torch.utils.data.Dataset):
    """Deterministic random token sequences: query, positive and one negative document per item."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        return {name: torch.randint(3, 120, (n,), generator=g) for name, n in
                (("query", 6 + i % 3), ("doc", 20 + i % 5), ("neg_doc", 18 + i % 4))}


def collate(items):
    """Left padding (ColQwen2's side) to the longest sequence of each column."""
    out = {}
    for name in ("query", "doc", "neg_doc"):
        seqs = [it[name] for it in items]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = s
            mask[r, width - len(s):] = 1
        if name == "neg_doc":  # (B, num_negatives, L)
            ids, mask = ids[:, None], mask[:, None]
        out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids, mask
    return out


def train_one_step(loss_func, tmp_path, tag):
    from transformers import TrainingArguments

    from colpali_engine.trainer.contrastive_trainer import ContrastiveTrainer

    model = tiny_colqwen2()
    args = TrainingArguments(output_dir=str(tmp_path / tag), max_steps=1, per_device_train_batch_size=8,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                             save_strategy="no", report_to=[], logging_steps=1, seed=0, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=TokenPairs(), eval_dataset=None,
                                 loss_func=loss_func, is_vision_model=False, data_collator=collate)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = trainer.train()
    return out.training_loss, before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_step_colbert_negative_ce_native_vs_patched(tmp_path):
    loss0, b0, a0 = train_one_step(closs.ColbertNegativeCELoss(normalize_scores=False), tmp_path, "native")
    me.patch()
    loss1, b1, a1 = train_one_step(closs.ColbertNegativeCELoss(normalize_scores=False), tmp_path, "patched")
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0), (loss0, loss1)
    hostlib.assert_same_update(b0, a0, b1, a1)


def test_training_step_matryoshka_loss_vs_released_maths(tmp_path):
    groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0), (6, 16, 1.0))  # within the shortest query / document
    loss0, b0, a0 = train_one_step(ReleasedStyleLoss(groups, 0.03), tmp_path, "released")
    loss1, b1, a1 = train_one_step(me.MatryoshkaColbertLoss(groups, 0.03), tmp_path, "fused")
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0), (loss0, loss1)
    hostlib.assert_same_update(b0, a0, b1, a1)


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()
# ---------------------------------------------------------------------------------------------
def _snapshot():
    from metaembed_kernels.integrations._patching import _host_modules

    snap = {(m.__name__, k): id(v) for m in _host_modules("colpali_engine") for k, v in vars(m).items()}
    snap["score_multi_vector"] = id(BaseVisualRetrieverProcessor.__dict__["score_multi_vector"])
    return snap


def test_patch_rebinds_and_unpatch_restores_exactly():
    import colpali_engine.utils.processing_utils as pu

    before = _snapshot()
    original_descriptor = BaseVisualRetrieverProcessor.__dict__["score_multi_vector"]
    me.patch()
    me.patch()
    assert li.maxsim_inbatch is me.maxsim_inbatch and li.maxsim_kd is me.maxsim_kd
    assert pu.maxsim_inbatch is me.maxsim_inbatch and host.maxsim_inbatch is me.maxsim_inbatch
    assert BaseVisualRetrieverProcessor.score_multi_vector is me.score_multi_vector
    from colpali_engine.models import ColQwen2Processor

    assert ColQwen2Processor.score_multi_vector is me.score_multi_vector  # every processor's score()
    me.unpatch()
    me.unpatch()
    assert BaseVisualRetrieverProcessor.__dict__["score_multi_vector"] is original_descriptor
    assert _snapshot() == before


# colpali's own tests of these functions, ported (tests/loss/test_li_losses.py: zero embeddings
# give log B and softplus(0); tests/utils/test_maxsim.py: dispatch vs the einsum baseline;
# tests/utils/test_processing_utils.py: list and padded inputs agree), run after patch() +
# unpatch() and while patched. The negative-document losses get 4-D negatives (B, 1, L, D): the
# older upstream tests pass 3-D ones, which colpali-engine 0.3.18 itself rejects (its maxsim_kd
# einsum needs 4 dims).
@pytest.fixture(params=("after_patch_unpatch", "patched"))
def state(request):
    me.patch()
    if request.param == "after_patch_unpatch":
        me.unpatch()
    return request.param


def test_host_zero_embeddings_losses(state):
    base = dict(temperature=1.0, normalize_scores=False)
    q, d = torch.zeros(3, 1, 4), torch.zeros(3, 1, 4)
    torch.testing.assert_close(closs.ColbertLoss(**base)(q, d), torch.log(torch.tensor(3.0)))
    torch.testing.assert_close(closs.ColbertLoss(**base, pos_aware_negative_filtering=True)(q, d),
                               closs.ColbertLoss(**base)(q, d))
    b = 2  # log 2 == softplus(0): the in-batch term of the negative losses adds the same value
    q, d = torch.zeros(b, 1, 3), torch.zeros(b, 1, 3)
    torch.testing.assert_close(closs.ColbertPairwiseCELoss(**base)(q, d), F.softplus(torch.tensor(0.0)))
    neg = torch.zeros(b, 1, 1, 3)
    for cls in (closs.ColbertNegativeCELoss, closs.ColbertPairwiseNegativeCELoss):
        for w in (0.0, 0.5):
            torch.testing.assert_close(cls(**base, in_batch_term_weight=w)(q, d, neg), F.softplus(torch.tensor(0.0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_maxsim_matches_einsum_baseline(state, dtype):
    torch.manual_seed(0)
    q, d = torch.randn(4, 6, 32, dtype=dtype), torch.randn(7, 10, 32, dtype=dtype)
    got = host.maxsim_inbatch(q, d)
    assert got.shape == (4, 7)
    torch.testing.assert_close(got, host._torch_maxsim(q, d), **tol(dtype))
    dk = torch.randn(4, 5, 8, 32, dtype=dtype)
    got = host.maxsim_kd(q, dk)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, host._torch_maxsim_kd(q, dk), **tol(dtype))


def test_host_score_multi_vector_list_equals_padded(state):
    torch.manual_seed(0)
    qs = [torch.randn(2, 32), torch.randn(4, 32)]
    ps = [torch.randn(8, 32), torch.randn(4, 32), torch.randn(16, 32)]
    from_list = BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, device="cpu")
    pad = torch.nn.utils.rnn.pad_sequence
    from_tensor = BaseVisualRetrieverProcessor.score_multi_vector(pad(qs, batch_first=True), pad(ps, batch_first=True),
                                                                  device="cpu")
    assert from_list.shape == (2, 3)
    torch.testing.assert_close(from_list, from_tensor)
