"""MetaEmbed wrapper on tiny random-config transformers backbones, built offline.

Backbones: a Qwen2-VL model (causal decoder, 3-D M-RoPE, image inputs as pixel_values +
image_grid_thw) and a BERT encoder (bidirectional, absolute positions). Each has a few
thousand parameters, so the whole file runs in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from metaembed_kernels import MatryoshkaInfoNCELoss, maxsim  # noqa: E402
from metaembed_kernels.model import CONFIG_NAME, WEIGHTS_NAME, MetaEmbed  # noqa: E402

RQ, RC = 4, 8
GROUPS = ((1, 1), (2, 4), (4, 8))
PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 100, 101, 102, 103
PIXEL_DIM = 3 * 1 * 2 * 2  # channels * temporal_patch * patch * patch


def tiny_qwen2_vl(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=256,
            # head_dim 8: 4 rotary frequency pairs split over (t, h, w)
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=1,
            in_channels=3,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return transformers.Qwen2VLModel(config).eval()


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,  # deterministic train-mode passes
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).eval()


# ---------------------------------------------------------------------------------------
# Inputs: unpadded sequences, and batches of them padded left or right
# ---------------------------------------------------------------------------------------
def image_sequence(grid_hw, text_before, text_after):
    """Token ids [text; <vision_start>; image placeholders; <vision_end>; text] and the
    matching flattened patches for one image of grid (1, h, w) patches (merged 2x2)."""
    h, w = grid_hw
    num_placeholders = h * w // 4
    ids = text_before + [VISION_START] + [IMAGE] * num_placeholders + [VISION_END] + text_after
    pixels = torch.randn(h * w, PIXEL_DIM)
    return ids, pixels, torch.tensor([1, h, w])


def pad_batch(sequences, side):
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, s in enumerate(sequences):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[b, span] = torch.tensor(s)
        mask[b, span] = 1
    return ids, mask


def vl_inputs(items, side):
    """Processor-style inputs for a batch of (ids, pixels or None, grid or None)."""
    ids, mask = pad_batch([item[0] for item in items], side)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).long()}
    pixels = [item[1] for item in items if item[1] is not None]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
        inputs["image_grid_thw"] = torch.stack([item[2] for item in items if item[2] is not None])
    return inputs


@pytest.fixture(scope="module")
def vl_items():
    torch.manual_seed(1)
    return [
        image_sequence((4, 4), [5, 6], [7, 8, 9]),
        ([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], None, None),  # text only
        image_sequence((4, 6), [], [21]),
        image_sequence((2, 4), [22, 23, 24, 25, 26, 27, 28, 29], [30, 31]),
    ]


@pytest.fixture(scope="module")
def text_sequences():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(5, 100, (n,), generator=g).tolist() for n in (3, 9, 1, 14, 6)]


def make_model(backbone, **kwargs):
    torch.manual_seed(3)
    kwargs.setdefault("groups", GROUPS)
    return MetaEmbed(backbone, RQ, RC, **kwargs)


# ---------------------------------------------------------------------------------------
# import, shapes
# ---------------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_transformers():
    code = (
        "import sys, metaembed_kernels as m\n"
        "assert 'transformers' not in sys.modules and 'metaembed_kernels.model' not in sys.modules\n"
        "assert m.MetaEmbed.__name__ == 'MetaEmbed'\n"
        "assert 'transformers' not in sys.modules, 'MetaEmbed must not import transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dim", [None, 16])
def test_shapes_and_unit_norm_bert(dim, text_sequences):
    model = make_model(tiny_bert(), dim=dim)
    ids, mask = pad_batch(text_sequences, "right")
    with torch.no_grad():
        q = model.encode_queries(input_ids=ids, attention_mask=mask)
        c = model.encode_candidates(input_ids=ids, attention_mask=mask)
    d = dim or 32
    assert q.shape == (len(text_sequences), RQ, d) and c.shape == (len(text_sequences), RC, d)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(q.shape[:2]))
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(c.shape[:2]))


def test_shapes_qwen2_vl_with_images(vl_items):
    model = make_model(tiny_qwen2_vl(), dim=8, normalize=False)
    with torch.no_grad():
        q = model.encode_queries(**vl_inputs(vl_items, "right"))
        c = model.encode_candidates(**vl_inputs(vl_items, "left"))
    assert q.shape == (4, RQ, 8) and c.shape == (4, RC, 8)
    assert not torch.allclose(q.norm(dim=-1), torch.ones(4, RQ))  # normalize=False respected


def test_query_and_candidate_vectors_come_from_the_two_meta_token_sets(text_sequences):
    model = make_model(tiny_bert())
    ids, mask = pad_batch(text_sequences, "right")
    with torch.no_grad():
        states = torch.nn.functional.normalize(model.meta_token_states(input_ids=ids, attention_mask=mask), dim=-1)
        torch.testing.assert_close(model.encode_queries(input_ids=ids, attention_mask=mask), states[:, :RQ])
        torch.testing.assert_close(model.encode_candidates(input_ids=ids, attention_mask=mask), states[:, RQ:])


# ---------------------------------------------------------------------------------------
# padding invariance: a sequence's embeddings do not depend on padding or batch companions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance_bert(side, text_sequences):
    model = make_model(tiny_bert(), dim=16)
    with torch.no_grad():
        alone = [model.encode_candidates(input_ids=torch.tensor([s])) for s in text_sequences]
        ids, mask = pad_batch(text_sequences, side)
        batched = model.encode_candidates(input_ids=ids, attention_mask=mask)
    for b, single in enumerate(alone):
        torch.testing.assert_close(batched[b : b + 1], single, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance_qwen2_vl_with_images(side, vl_items):
    model = make_model(tiny_qwen2_vl())
    with torch.no_grad():
        alone = [model.encode_candidates(**vl_inputs([item], side)) for item in vl_items]
        batched = model.encode_candidates(**vl_inputs(vl_items, side))
        # a different companion set and order: the last two items reversed, padded to a
        # different length by an extra long text-only sequence
        extra = ([40 + k for k in range(20)], None, None)
        reordered = model.encode_candidates(**vl_inputs([extra, vl_items[3], vl_items[2]], side))
    for b, single in enumerate(alone):
        torch.testing.assert_close(batched[b : b + 1], single, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(reordered[1:2], alone[3], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(reordered[2:3], alone[2], atol=2e-6, rtol=1e-5)


def test_padding_changes_the_result_without_the_wrapper_positions(text_sequences):
    """The invariance test can fail: BERT with default (0..L-1) positions on a left-padded
    batch gives different meta-token states, which is what the wrapper's positions fix."""
    model = make_model(tiny_bert())
    ids, mask = pad_batch(text_sequences, "left")
    call, meta_positions = model._extend_inputs(model.backbone, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        with_positions = model.backbone(**call).last_hidden_state
        call.pop("position_ids")
        without = model.backbone(**call).last_hidden_state
    index = meta_positions.unsqueeze(-1).expand(-1, -1, 32)
    assert not torch.allclose(with_positions.gather(1, index), without.gather(1, index), atol=1e-3)


# ---------------------------------------------------------------------------------------
# the lengthened inputs themselves
# ---------------------------------------------------------------------------------------
def test_meta_tokens_follow_the_last_valid_token_and_masks_are_extended(vl_items):
    model = make_model(tiny_qwen2_vl())
    for side in ("left", "right"):
        inputs = vl_inputs(vl_items, side)
        call, meta_positions = model._extend_inputs(model.backbone, dict(inputs))
        length = inputs["input_ids"].shape[1]
        for b, item in enumerate(vl_items):
            n = len(item[0])
            start = length - n if side == "left" else 0
            # tokens keep their order, meta tokens come right after them, pads are masked
            assert meta_positions[b].tolist() == list(range(start + n, start + n + RQ + RC))
            assert call["input_ids"][b, start : start + n].tolist() == item[0]
            assert call["attention_mask"][b].sum() == n + RQ + RC
            assert call["attention_mask"][b, start : start + n + RQ + RC].all()
            assert call["mm_token_type_ids"][b, meta_positions[b]].eq(0).all()  # text type
            torch.testing.assert_close(
                call["inputs_embeds"][b, meta_positions[b]], model.meta_tokens.detach()
            )


def test_qwen2_vl_meta_positions_are_what_the_backbone_gives_appended_text(vl_items):
    """3-D M-RoPE: the wrapper's positions for a padded batch equal those Qwen2-VL's own
    get_rope_index computes for each unpadded sequence with R_q + R_c text tokens appended."""
    model = make_model(tiny_qwen2_vl())
    backbone = model.backbone
    call, meta_positions = model._extend_inputs(backbone, dict(vl_inputs(vl_items, "left")))
    grids = iter(vl_inputs(vl_items, "left")["image_grid_thw"])
    for b, (ids, pixels, grid) in enumerate(vl_items):
        appended = torch.tensor([ids + [7] * (RQ + RC)])
        own, _ = backbone.get_rope_index(
            appended,
            mm_token_type_ids=(appended == IMAGE).long(),
            image_grid_thw=None if pixels is None else next(grids)[None],
            attention_mask=torch.ones_like(appended),
        )
        valid = call["attention_mask"][b].bool()
        torch.testing.assert_close(call["position_ids"][:, b, valid], own[:, 0])
        # meta tokens continue after the largest image/text position, in all three planes
        expected_start = own[:, 0, : len(ids)].max() + 1
        assert call["position_ids"][:, b, meta_positions[b]].eq(
            expected_start + torch.arange(RQ + RC)
        ).all()


def test_qwen2_vl_matches_the_backbone_running_its_own_rope(vl_items):
    """End to end: encoding equals a manual backbone call on the lengthened inputs where the
    backbone derives M-RoPE itself from the extended mm_token_type_ids."""
    model = make_model(tiny_qwen2_vl())
    inputs = vl_inputs(vl_items, "right")
    with torch.no_grad():
        ours = model.meta_token_states(**inputs)
        call, meta_positions = model._extend_inputs(model.backbone, dict(inputs))
        call.pop("position_ids")
        model.backbone.rope_deltas = None
        hidden = model.backbone(**call).last_hidden_state
    index = meta_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    torch.testing.assert_close(ours, hidden.gather(1, index))


def test_user_position_ids_are_continued(text_sequences):
    model = make_model(tiny_bert())
    ids, mask = pad_batch(text_sequences, "left")
    positions = (mask.cumsum(1) - 1).clamp_min(0) + 5  # an offset the wrapper must keep
    call, meta_positions = model._extend_inputs(
        model.backbone, {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    )
    for b, s in enumerate(text_sequences):
        assert call["position_ids"][b, meta_positions[b]].tolist() == list(range(5 + len(s), 5 + len(s) + RQ + RC))


def test_inputs_embeds_equal_input_ids(text_sequences):
    model = make_model(tiny_bert())
    ids, mask = pad_batch(text_sequences, "right")
    with torch.no_grad():
        from_ids = model.encode_queries(input_ids=ids, attention_mask=mask)
        embeds = model.backbone.get_input_embeddings()(ids)
        from_embeds = model.encode_queries(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(from_ids, from_embeds)


# ---------------------------------------------------------------------------------------
# training: loss, gradients, optimisation
# ---------------------------------------------------------------------------------------
def text_pairs(num_pairs: int, seed: int):
    """Queries and their positives that share tokens, so that the task is learnable."""
    g = torch.Generator().manual_seed(seed)
    queries, candidates = [], []
    for _ in range(num_pairs):
        topic = torch.randint(5, 100, (4,), generator=g).tolist()
        noise = torch.randint(5, 100, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        queries.append(topic[:2] + noise[:2])
        candidates.append(noise[2:] + topic)
    return queries, candidates


def test_loss_is_the_matryoshka_infonce_of_the_embeddings_with_hard_negatives():
    model = make_model(tiny_bert(), dim=16, temperature=0.05)
    queries, candidates = text_pairs(6, seed=4)
    q_in = dict(zip(("input_ids", "attention_mask"), pad_batch(queries, "right")))
    c_in = dict(zip(("input_ids", "attention_mask"), pad_batch(candidates, "left")))
    negatives = [candidates[(a + 1) % 6] + [9] for a in range(6) for _ in range(2)]  # K = 2
    n_in = dict(zip(("input_ids", "attention_mask"), pad_batch(negatives, "right")))
    with torch.no_grad():
        out = model(q_in, c_in, n_in)
        expected = MatryoshkaInfoNCELoss(GROUPS, temperature=0.05)(
            model.encode_queries(**q_in),
            model.encode_candidates(**c_in),
            model.encode_candidates(**n_in).view(6, 2, RC, 16),
        )
    assert out.hard_negative_embeddings.shape == (6, 2, RC, 16)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("backbone_name", ["bert", "qwen2_vl"])
def test_gradients_reach_every_meta_token_and_the_projection(backbone_name, vl_items):
    if backbone_name == "bert":
        model = make_model(tiny_bert(), dim=16)
        queries, candidates = text_pairs(4, seed=5)
        q_in = dict(zip(("input_ids", "attention_mask"), pad_batch(queries, "left")))
        c_in = dict(zip(("input_ids", "attention_mask"), pad_batch(candidates, "right")))
    else:
        model = make_model(tiny_qwen2_vl(), dim=16)
        q_in = vl_inputs([(item[0][-3:], None, None) for item in vl_items], "left")  # text queries
        c_in = vl_inputs(vl_items, "left")  # image candidates
    model.train()
    model(q_in, c_in).loss.backward()
    grad = model.meta_tokens.grad
    # M_q rows get gradient from the query side and M_c rows from the candidate side
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=1) > 0).all(), grad.abs().sum(dim=1)
    assert model.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone_name", ["bert", "qwen2_vl"])
def test_a_few_optimizer_steps_reduce_the_loss(backbone_name, vl_items):
    torch.manual_seed(6)
    if backbone_name == "bert":
        model = make_model(tiny_bert(), dim=16)
        queries, candidates = text_pairs(8, seed=6)
        q_in = dict(zip(("input_ids", "attention_mask"), pad_batch(queries, "right")))
        c_in = dict(zip(("input_ids", "attention_mask"), pad_batch(candidates, "left")))
    else:
        model = make_model(tiny_qwen2_vl(), dim=16)
        q_in = vl_inputs([(item[0][:2] + item[0][-2:], None, None) for item in vl_items], "left")
        c_in = vl_inputs(vl_items, "right")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(q_in, c_in).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------
# persistence, LoRA, gradient checkpointing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, 16])
def test_save_and_load_round_trip(tmp_path, dim, vl_items):
    model = make_model(tiny_qwen2_vl(), dim=dim, temperature=0.07, group_weights=[1.0, 2.0, 0.5])
    with torch.no_grad():
        model.meta_tokens.add_(0.1)  # differ from any fresh initialisation
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    assert (tmp_path / "config.json").is_file()  # the backbone's own save, next to ours
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(saved) == ({"meta_tokens"} if dim is None else {"meta_tokens", "projection.weight"})

    loaded = MetaEmbed.from_pretrained(str(tmp_path)).eval()
    assert (loaded.num_query_tokens, loaded.num_candidate_tokens, loaded.groups) == (RQ, RC, GROUPS)
    assert loaded.loss_fn.temperature == 0.07 and list(loaded.loss_fn.weights) == [1.0, 2.0, 0.5]
    torch.testing.assert_close(loaded.meta_tokens, model.meta_tokens)
    inputs = vl_inputs(vl_items, "left")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_candidates(**inputs), model.encode_candidates(**inputs))


def test_lora_with_gradient_checkpointing_trains_adapters_and_meta_tokens_only(tmp_path):
    peft = pytest.importorskip("peft")
    queries, candidates = text_pairs(6, seed=7)
    q_in = dict(zip(("input_ids", "attention_mask"), pad_batch(queries, "right")))
    c_in = dict(zip(("input_ids", "attention_mask"), pad_batch(candidates, "left")))

    def build():
        backbone = peft.get_peft_model(
            tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
        )
        return make_model(backbone, dim=16).train()

    plain, checkpointed = build(), build()
    checkpointed.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers 5 a deprecated flag
        loss_plain = plain(q_in, c_in).loss
        loss_checkpointed = checkpointed(q_in, c_in).loss
        loss_plain.backward()
        loss_checkpointed.backward()
    torch.testing.assert_close(loss_checkpointed, loss_plain)

    grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.requires_grad}
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert "meta_tokens" in grads and "projection.weight" in grads
    assert any("lora_A" in n for n in grads) and all("lora_" in n or "backbone" not in n for n in grads)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, plain_grads[name], atol=1e-6, rtol=1e-4)
    frozen = [p for n, p in checkpointed.named_parameters() if "backbone" in n and "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)

    # PEFT save holds the adapter only; loading puts it back onto a fresh base model
    checkpointed.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["backbone_is_peft"] and config["backbone_class"] == "BertModel"
    loaded = MetaEmbed.from_pretrained(str(tmp_path), backbone=tiny_bert(seed=0)).eval()
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_queries(**q_in), checkpointed.encode_queries(**q_in))


def test_score_uses_the_budget_prefixes(text_sequences):
    model = make_model(tiny_bert())
    ids, mask = pad_batch(text_sequences, "right")
    with torch.no_grad():
        q = model.encode_queries(input_ids=ids, attention_mask=mask)
        c = model.encode_candidates(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model.score(q, c, (2, 4)), maxsim(q[:, :2].contiguous(), c[:, :4].contiguous()))
    torch.testing.assert_close(model.score(q, c), maxsim(q, c))
    with pytest.raises(ValueError, match="out of range"):
        model.score(q, c, (RQ + 1, 1))


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_bad_construction_arguments():
    backbone = tiny_bert()
    with pytest.raises(TypeError, match="backbone"):
        MetaEmbed(torch.nn.Linear(2, 2), RQ, RC, groups=GROUPS)
    with pytest.raises(ValueError, match="num_query_tokens"):
        MetaEmbed(backbone, 0, RC, groups=GROUPS)
    with pytest.raises(TypeError, match="num_candidate_tokens"):
        MetaEmbed(backbone, RQ, 8.0, groups=GROUPS)
    with pytest.raises(ValueError, match="dim"):
        MetaEmbed(backbone, RQ, RC, dim=0, groups=GROUPS)
    with pytest.raises(ValueError, match="groups"):
        MetaEmbed(backbone, RQ, RC)  # DEFAULT_GROUPS need R_q >= 16, R_c >= 64
    with pytest.raises(ValueError, match="temperature"):
        MetaEmbed(backbone, RQ, RC, groups=GROUPS, temperature=0.0)


def test_bad_encode_inputs(vl_items):
    model = make_model(tiny_bert())
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model.encode_queries(attention_mask=torch.ones_like(ids))
    with pytest.raises(TypeError, match="input_ids"):
        model.encode_queries(input_ids=ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_queries(input_ids=ids, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_queries(input_ids=ids, attention_mask=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="token_type_ids"):
        model.encode_queries(input_ids=ids, token_type_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="past_key_values"):
        model.encode_queries(input_ids=ids, past_key_values=None)
    with pytest.raises(TypeError, match="queries"):
        model([1, 2], {"input_ids": ids})
    with pytest.raises(ValueError, match="hard_negatives"):
        model({"input_ids": ids.repeat(2, 1)}, {"input_ids": ids.repeat(2, 1)}, {"input_ids": ids.repeat(3, 1)})

    vl_model = make_model(tiny_qwen2_vl())
    inputs = vl_inputs(vl_items[:1], "left")
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        vl_model.encode_queries(**inputs)


def test_from_pretrained_rejects_a_directory_without_a_metaembed_save(tmp_path):
    with pytest.raises(ValueError, match="not a MetaEmbed save"):
        MetaEmbed.from_pretrained(str(tmp_path))
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / CONFIG_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format"):
        MetaEmbed.from_pretrained(str(tmp_path / "x"))
