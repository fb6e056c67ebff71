"""The adapters without any host library installed (part of `make test`): import isolation, each
host's mask convention against an independent einsum statement of it, MatryoshkaColbertLoss
against the released loss's maths, and the reversible by-name patcher on a fake host package.
The tests inside the real hosts are tests/integrations/test_<host>.py (make test-integrations)."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hostlib import assert_close_rel, leaf, skiplist_mask, unit
from metaembed_kernels.integrations import colpali as me_colpali
from metaembed_kernels.integrations import pylate as me_pylate
from metaembed_kernels.integrations import sentence_transformers as me_st
from metaembed_kernels.integrations._patching import Patcher

HOSTS = ("pylate", "colpali_engine", "sentence_transformers", "transformers")


def test_importing_never_imports_a_host_library():
    code = (
        "import sys, metaembed_kernels, metaembed_kernels.integrations\n"
        "from metaembed_kernels.integrations import pylate, colpali, sentence_transformers\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({HOSTS!r}))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def inputs(seed=0, nq=4, nd=5, lq=9, ld=13, d=16, negative=False):
    g = torch.Generator().manual_seed(seed)
    q = unit(nq, lq, d, sign=1 if negative else 0, generator=g)
    c = unit(nd, ld, d, sign=-1 if negative else 0, generator=g)
    qm, cm = skiplist_mask(nq, lq, generator=g), skiplist_mask(nd, ld, generator=g)
    cm[2] = False
    return q, c, qm, cm


@pytest.mark.parametrize("negative", (False, True))
def test_pylate_convention_masked_tokens_are_zero_similarities(negative):
    q, c, qm, cm = inputs(negative=negative)
    sim = torch.einsum("aid,bjd->abij", q, c) * qm[:, None, :, None] * cm[None, :, None, :]
    want = sim.max(-1).values.sum(-1)
    torch.testing.assert_close(me_pylate.colbert_scores(q, c, qm, cm), want)
    # float masks promote like PyLate's `scores * mask`
    assert me_pylate.colbert_scores(q.bfloat16(), c.bfloat16(), qm.float(), None).dtype == torch.float32
    assert me_pylate.colbert_scores(q.bfloat16(), c.bfloat16(), qm, cm).dtype == torch.bfloat16


@pytest.mark.parametrize("negative", (False, True))
def test_sentence_transformers_convention_excludes_and_sentinels(negative):
    q, c, qm, cm = inputs(negative=negative)
    sim = torch.einsum("aid,bjd->abij", q, c).masked_fill(~cm[None, :, None, :], float("-inf"))
    want = (sim.max(-1).values * qm[:, None, :]).sum(-1)
    want = want.masked_fill(~cm.any(-1)[None, :], me_st.EMPTY_DOCUMENT_SCORE)
    torch.testing.assert_close(me_st.maxsim(q, c, a_mask=qm, b_mask=cm), want)
    torch.testing.assert_close(me_st.maxsim_pairwise(q, c[:4], a_mask=qm, b_mask=cm[:4]), want.diagonal())


def test_colpali_zero_padding_is_a_similarity_zero_token():
    q, c, _, cm = inputs(negative=True)
    c = c * cm[..., None]  # zero padding, no masks
    want = torch.einsum("aid,bjd->abij", q, c).amax(-1).sum(-1)
    torch.testing.assert_close(me_colpali.maxsim_inbatch(q, c), want)
    kd = c.view(1, 5, 13, 16).expand(4, -1, -1, -1)
    torch.testing.assert_close(me_colpali.maxsim_kd(q, kd), want)


def test_bad_arguments_name_the_argument():
    q, c, qm, cm = inputs()
    with pytest.raises(ValueError, match="documents_mask"):
        me_pylate.colbert_scores(q, c, qm, cm[:, :3])
    with pytest.raises(ValueError, match="budget"):
        me_st.MaxSim(budget=(1, 2, 3))
    with pytest.raises(ValueError, match="form"):
        me_st.MaxSim(form="listwise")
    with pytest.raises(ValueError, match="b_mask"):
        me_st.maxsim(q, c, b_mask=cm[:, :3])
    with pytest.raises(ValueError, match="No passages"):
        me_colpali.score_multi_vector([q[0]], [])


def released_style_loss(q, c, neg, groups, temperature, offset=0):
    """MetaEmbed's released loss maths: one 4-D einsum, sliced per group (read, not copied)."""
    raw = torch.einsum("bnd,csd->bcns", q, c)
    raw_neg = torch.einsum("bnd,bksd->bkns", q, neg)
    labels = torch.arange(q.shape[0]) + offset
    total = 0.0
    for r_q, r_c, w in groups:
        logits = torch.cat([raw[:, :, :r_q, :r_c].amax(-1).sum(-1), raw_neg[:, :, :r_q, :r_c].amax(-1).sum(-1)], 1)
        total = total + w * F.cross_entropy(logits / temperature, labels)
    return total / len(groups)


def test_matryoshka_colbert_loss_matches_released_maths():
    g = torch.Generator().manual_seed(3)
    q, c, n = unit(5, 16, 32, generator=g), unit(8, 64, 32, generator=g), unit(5, 2, 64, 32, generator=g)
    groups = ((1, 1, 1.0), (2, 4, 0.5), (4, 8, 1.0), (8, 16, 2.0), (16, 64, 1.0))
    leaves0, leaves1 = [leaf(x) for x in (q, c, n)], [leaf(x) for x in (q, c, n)]
    want = released_style_loss(*leaves0, groups, 0.03, offset=2)
    got = me_colpali.MatryoshkaColbertLoss(groups, temperature=0.03)(*leaves1, offset=2)
    want.backward()
    got.backward()
    assert_close_rel(got, want, 1e-5, "loss")
    for i, (a, b) in enumerate(zip(leaves1, leaves0)):
        assert_close_rel(a.grad, b.grad, 1e-5, f"gradient of input {i}")


# ---------------------------------------------------------------------------------------------
# the patcher, on a fake host package
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_host():
    def score(x):
        return "host"

    def ours(x):
        return "ours"

    root = types.ModuleType("fakehost")
    scores = types.ModuleType("fakehost.scores")
    scores.score = score
    losses = types.ModuleType("fakehost.losses")
    losses.score = score  # `from .scores import score`

    class Loss:
        def __init__(self, metric=score, *, other=score):
            self.metric, self.other = metric, other

    Loss.__module__ = "fakehost.losses"
    losses.Loss = Loss
    mods = {"fakehost": root, "fakehost.scores": scores, "fakehost.losses": losses}
    sys.modules.update(mods)
    patcher = Patcher("fakehost", tuple(mods), lambda: [(score, ours)])
    yield types.SimpleNamespace(score=score, ours=ours, scores=scores, losses=losses, patcher=patcher)
    patcher.unpatch()
    for name in mods:
        sys.modules.pop(name, None)
    sys.modules.pop("fakehost.late", None)


def test_patcher_rebinds_names_and_defaults_idempotently_and_reverses_exactly(fake_host):
    h = fake_host
    defaults, kwdefaults = h.losses.Loss.__init__.__defaults__, h.losses.Loss.__init__.__kwdefaults__
    h.patcher.patch()
    h.patcher.patch()
    assert h.scores.score is h.ours and h.losses.score is h.ours
    loss = h.losses.Loss()
    assert loss.metric is h.ours and loss.other is h.ours
    late = types.ModuleType("fakehost.late")  # imported while patched: copies the patched name
    late.score = h.scores.score
    sys.modules["fakehost.late"] = late
    h.patcher.unpatch()
    h.patcher.unpatch()
    assert h.scores.score is h.score and h.losses.score is h.score and late.score is h.score
    assert h.losses.Loss.__init__.__defaults__ is defaults
    assert h.losses.Loss.__init__.__kwdefaults__ is kwdefaults
    assert h.losses.Loss().metric is h.score
