"""``MetaEmbed``: learnable meta tokens on a Hugging Face backbone (arXiv 2509.18095).

Every input, query or candidate alike, becomes

    [input tokens (text, and image/video placeholders); M_q (R_q tokens); M_c (R_c tokens)]

where M_q and M_c are rows of one learnable (R_q + R_c, hidden) table, inserted right after
each sequence's last valid token (as the released MetaEmbed code does). A query is the
last-layer states at the M_q positions, a candidate those at the M_c positions, each
optionally projected to ``dim`` and L2-normalised:

    E_q = normalize(W h[M_q])  (B, R_q, D)        E_c = normalize(W h[M_c])  (B, R_c, D)

and a Matryoshka budget (r_q, r_c) scores with the first r_q / r_c vectors:

    s(q, c) = sum_{i < r_q} max_{j < r_c} <E_q[i], E_c[j]>.

Padding. Meta tokens go right after the last valid token, so a right-padded row becomes
[tokens; meta; pads] and a left-padded one [pads; tokens; meta]. Position ids count valid
tokens only (cumsum of the mask), so a sequence's positions, and hence its embeddings, do
not depend on its padding or on the other sequences of the batch. Qwen2-VL style models
get their 3-D M-RoPE positions from the backbone's own ``get_rope_index`` on the extended
sequence, where the meta tokens are text (``mm_token_type_ids`` = 0): they continue after
the largest position of the sequence, exactly as appended text would.

This module imports neither transformers nor peft; only ``from_pretrained`` needs them.
Tested with transformers 5.x. Qwen2-VL needs the layout of transformers >= 4.52, where
``Qwen2VLModel`` holds the vision tower and ``get_rope_index``.
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as V
from .functional import DEFAULT_GROUPS, maxsim
from .loss import MatryoshkaInfoNCELoss

CONFIG_NAME = "metaembed_config.json"
WEIGHTS_NAME = "metaembed.safetensors"
_FORMAT_VERSION = 1

# Inputs that are per-token (B, L) and must be lengthened with the meta tokens, with the
# value the meta positions take: token_type_ids 0 (segment A, as for BERT's single
# sentences); mm_token_type_ids 0 (= text for Qwen2-VL's M-RoPE).
_PER_TOKEN_INPUTS = {"token_type_ids": 0, "mm_token_type_ids": 0}
# Inputs whose presence means the backbone must see input_ids to place vision features,
# and which switch position ids to the backbone's 3-D rope index.
_VISION_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
# Inputs that make no sense for an encoder pass (they belong to generation or LM training).
_REJECTED_INPUTS = ("past_key_values", "labels", "use_cache", "output_attentions", "return_dict")


@dataclass
class MetaEmbedOutput:
    """What ``MetaEmbed.forward`` returns.

    loss: scalar Matryoshka InfoNCE loss.
    query_embeddings: (B, R_q, D); candidate_embeddings: (B, R_c, D);
    hard_negative_embeddings: (B, K, R_c, D) or None.
    """

    loss: torch.Tensor
    query_embeddings: torch.Tensor
    candidate_embeddings: torch.Tensor
    hard_negative_embeddings: Optional[torch.Tensor] = None


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_tensor(name: str, value, ndim: int, layout: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(value.shape)}")


def _check_padding_mask_values(attention_mask: torch.Tensor) -> None:
    """attention_mask holds only 0 and 1: checked on the host for CPU tensors, by a
    device-side assert for accelerator tensors (no host sync inside a training step)."""
    if attention_mask.dtype == torch.bool:
        return
    message = "attention_mask must hold only 0 and 1 (a padding mask)"
    binary = ((attention_mask == 0) | (attention_mask == 1)).all()
    if attention_mask.device.type != "cpu":
        torch._assert_async(binary, message)
        return
    try:  # on CPU the assert fails at once
        torch._assert_async(binary, message)
    except RuntimeError:
        raise ValueError(message) from None


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected into it in place,
    so calling it runs the adapters). Duck-typed so that peft need not be installed."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _accepted_parameters(fn) -> Tuple[set, bool]:
    """(named parameters, whether it also takes **kwargs) of a callable."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


class MetaEmbed(nn.Module):
    """MetaEmbed multi-vector embedder on a transformers backbone.

    Args:
        backbone: a transformers model that takes ``inputs_embeds`` (e.g. ``BertModel``,
            ``Qwen2VLModel`` or ``Qwen2VLForConditionalGeneration``), optionally wrapped
            by PEFT. Heads are skipped: the wrapper runs ``backbone.base_model`` and reads
            its ``last_hidden_state``.
        num_query_tokens: R_q, meta tokens read for a query (16 in the paper).
        num_candidate_tokens: R_c, meta tokens read for a candidate (64 in the paper).
        dim: output dimension of an optional bias-free linear projection; None keeps the
            backbone's hidden size (the paper's 7B model uses none).
        normalize: L2-normalise each output vector (on by default, as in the paper).
        groups: Matryoshka (r_q, r_c) budgets trained by the loss (nested prefixes).
        temperature: InfoNCE temperature (0.03 in the paper).
        group_weights: optional per-group loss weights (default 1 each).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_query_tokens: int = 16,
        num_candidate_tokens: int = 64,
        dim: Optional[int] = None,
        normalize: bool = True,
        groups: Sequence[Tuple[int, int]] = DEFAULT_GROUPS,
        *,
        temperature: float = 0.03,
        group_weights: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if not callable(getattr(backbone, "get_input_embeddings", None)):
            raise TypeError(
                "backbone must be a transformers model with get_input_embeddings() "
                f"(the meta tokens live in its input-embedding space); got {type(backbone).__name__}"
            )
        self.num_query_tokens = _check_positive_int("num_query_tokens", num_query_tokens)
        self.num_candidate_tokens = _check_positive_int("num_candidate_tokens", num_candidate_tokens)
        if dim is not None:
            dim = _check_positive_int("dim", dim)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.groups = V.normalize_groups(groups, self.num_query_tokens, self.num_candidate_tokens)
        self.backbone = backbone

        word_embeddings = backbone.get_input_embeddings()
        table = getattr(word_embeddings, "weight", None)
        if not isinstance(table, torch.Tensor) or table.ndim != 2:
            raise TypeError(
                "backbone.get_input_embeddings() must be an embedding module with a 2-D weight, "
                f"got {type(word_embeddings).__name__}"
            )
        self.hidden_size = table.shape[1]
        num_meta = self.num_query_tokens + self.num_candidate_tokens
        # Initialise the meta tokens like an average vocabulary row: N(mean, std) of the
        # embedding table, per coordinate. nn.Embedding's N(0, 1) would sit far outside
        # the distribution of a pretrained table (std ~0.02-0.05) and swamp the layer norms.
        with torch.no_grad():
            ref = table.detach().float()
            mean, std = ref.mean(dim=0), ref.std(dim=0).clamp_min(1e-6)
            init = mean + std * torch.randn(num_meta, self.hidden_size, device=table.device)
        # Rows 0..R_q-1 are M_q, rows R_q..R_q+R_c-1 are M_c.
        self.meta_tokens = nn.Parameter(init.to(table.dtype))
        self.output_dim = dim if dim is not None else self.hidden_size
        # No bias: the vectors are L2-normalised and compared by dot products, where a
        # shared offset only adds a constant direction to every vector.
        self.projection = (
            nn.Linear(self.hidden_size, dim, bias=False, device=table.device, dtype=table.dtype)
            if dim is not None
            else None
        )
        self.normalize = normalize
        self.loss_fn = MatryoshkaInfoNCELoss(self.groups, group_weights, temperature)

    # ----------------------------------------------------------------------------------
    # encoding
    # ----------------------------------------------------------------------------------
    def encode_queries(self, **inputs) -> torch.Tensor:
        """Query embeddings (B, R_q, D) from tokenizer/processor outputs."""
        return self._encode(inputs)[:, : self.num_query_tokens]

    def encode_candidates(self, **inputs) -> torch.Tensor:
        """Candidate embeddings (B, R_c, D) from tokenizer/processor outputs."""
        return self._encode(inputs)[:, self.num_query_tokens :]

    def _encode(self, inputs: Dict[str, Any]) -> torch.Tensor:
        """(B, R_q + R_c, D) output vectors of all meta tokens: both sets are appended to
        every input (as in the released code), the caller keeps the set it needs."""
        states = self.meta_token_states(**inputs)
        if self.projection is not None:
            states = self.projection(states)
        if self.normalize:
            # Normalise in fp32: a bf16 sum of squares over thousands of coordinates loses
            # the last bits that rank near-tied candidates.
            states = F.normalize(states.float(), dim=-1).to(states.dtype)
        return states

    def meta_token_states(self, **inputs) -> torch.Tensor:
        """Last-layer hidden states (B, R_q + R_c, hidden) at the meta-token positions."""
        model = self._hidden_state_model()
        call, meta_positions = self._extend_inputs(model, dict(inputs))
        outputs = model(**call)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        index = meta_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)

    def _hidden_state_model(self) -> nn.Module:
        """The module that returns last_hidden_state: the backbone without PEFT wrapper
        and without task head (an LM head over the vocabulary would waste time and memory)."""
        model = _unwrap_peft(self.backbone)
        base = getattr(model, "base_model", None)
        return base if isinstance(base, nn.Module) else model

    def _extend_inputs(self, model: nn.Module, inputs: Dict[str, Any]):
        """Insert the meta tokens after each sequence's last valid token.

        Returns the keyword arguments for ``model`` and the (B, R_q + R_c) positions of the
        meta tokens in the lengthened sequences.
        """
        for name in _REJECTED_INPUTS:
            if name in inputs:
                raise ValueError(f"{name} is not accepted by MetaEmbed encoders (single encoder pass)")
        input_ids = inputs.pop("input_ids", None)
        inputs_embeds = inputs.pop("inputs_embeds", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_tensor("input_ids", input_ids, 2, "(B, L)")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
            batch, length = input_ids.shape
            device = input_ids.device
        else:
            _check_tensor("inputs_embeds", inputs_embeds, 3, "(B, L, hidden)")
            if inputs_embeds.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have hidden size {self.hidden_size}, "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            batch, length = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if batch == 0:
            raise ValueError("the batch is empty (B = 0)")

        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        else:
            _check_tensor("attention_mask", attention_mask, 2, "(B, L)")
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(
                    f"attention_mask must have shape (B, L) = ({batch}, {length}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            _check_padding_mask_values(attention_mask)
        valid = attention_mask.to(device=device, dtype=torch.bool)

        num_meta = self.num_query_tokens + self.num_candidate_tokens
        new_length = length + num_meta
        # last[b]: index of the last valid token (-1 if none). Original token t moves to
        # t + num_meta if it comes after last[b] (right padding), else stays; the meta
        # tokens take positions last[b] + 1 ... last[b] + num_meta.
        positions = torch.arange(length, device=device)
        last = torch.where(valid, positions, -1).amax(dim=1)  # (B,)
        token_destination = positions + num_meta * (positions > last[:, None])  # (B, L)
        meta_positions = last[:, None] + 1 + torch.arange(num_meta, device=device)  # (B, R)
        # source[b, n]: which element of cat([tokens, meta], dim=1) lands at position n.
        destination = torch.cat([token_destination, meta_positions], dim=1)
        source = torch.empty_like(destination).scatter_(
            1, destination, torch.arange(new_length, device=device).expand(batch, -1).contiguous()
        )

        def lengthen(x: torch.Tensor, meta_value: torch.Tensor) -> torch.Tensor:
            """x (B, L, ...) -> (B, L + R, ...), with meta_value (B, R, ...) at the meta slots."""
            both = torch.cat([x, meta_value.to(dtype=x.dtype, device=x.device)], dim=1)
            index = source.view(batch, new_length, *([1] * (x.ndim - 2))).expand(
                batch, new_length, *x.shape[2:]
            )
            return both.gather(1, index)

        if inputs_embeds is None:
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
        meta = self.meta_tokens.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        call: Dict[str, Any] = {"inputs_embeds": lengthen(inputs_embeds, meta)}
        mask_ext = lengthen(attention_mask, attention_mask.new_ones(batch, num_meta))
        call["attention_mask"] = mask_ext

        for name, meta_value in _PER_TOKEN_INPUTS.items():
            value = inputs.pop(name, None)
            if value is None:
                continue
            _check_tensor(name, value, 2, "(B, L)")
            if tuple(value.shape) != (batch, length):
                raise ValueError(f"{name} must have shape (B, L) = ({batch}, {length}), got {tuple(value.shape)}")
            call[name] = lengthen(value, value.new_full((batch, num_meta), meta_value))

        uses_vision = any(inputs.get(name) is not None for name in _VISION_INPUTS)
        ids_ext = None
        if input_ids is not None:
            ids_ext = lengthen(input_ids, input_ids.new_full((batch, num_meta), self._placeholder_id()))
        if uses_vision:
            if ids_ext is None:
                raise ValueError(
                    "image/video inputs need input_ids (the backbone places vision features at "
                    "its image/video placeholder tokens); got inputs_embeds"
                )
            # A VLM takes input_ids and inputs_embeds together: the ids locate the vision
            # placeholders, the embeddings (with the meta tokens in) feed the decoder.
            call["input_ids"] = ids_ext

        accepted, _ = _accepted_parameters(model.forward)
        position_ids = inputs.pop("position_ids", None)
        if position_ids is not None:
            call["position_ids"] = self._extend_position_ids(position_ids, valid, lengthen, batch, length)
        elif uses_vision and callable(getattr(model, "get_rope_index", None)):
            call["position_ids"] = self._rope_index(model, ids_ext, mask_ext, call, inputs)
        elif "position_ids" in accepted:
            # 0, 1, 2, ... over valid tokens (meta tokens included); pads get 0. Without
            # this, absolute-position encoders (BERT) would shift a left-padded sequence.
            call["position_ids"] = (mask_ext.long().cumsum(dim=1) - 1).clamp_min(0)
        if "use_cache" in accepted:
            call["use_cache"] = False  # no KV cache: one encoder pass, no generation
        call.update(inputs)  # pixel_values, image_grid_thw, ... pass through unchanged
        return call, meta_positions

    def _placeholder_id(self) -> int:
        """Token id written at the meta positions of the lengthened input_ids (their
        embeddings are replaced by the meta tokens; only a VLM reads the ids, to find its
        image/video placeholders, so the id must not be one of those)."""
        config = getattr(_unwrap_peft(self.backbone), "config", None)
        reserved = {
            getattr(config, name, None)
            for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None), 0, 1, 2, 3, 4):
            if isinstance(candidate, int) and candidate not in reserved:
                return candidate
        raise ValueError("could not choose a placeholder token id outside the vision token ids")

    def _extend_position_ids(self, position_ids, valid, lengthen, batch, length):
        """User-given positions, (B, L) or (P, B, L) (P = 3 for M-RoPE): the meta tokens
        continue after the largest position of the sequence's valid tokens, as text
        appended to the sequence would."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.ndim not in (2, 3):
            raise ValueError("position_ids must be a (B, L) or (P, B, L) tensor")
        if tuple(position_ids.shape[-2:]) != (batch, length):
            raise ValueError(
                f"position_ids must end in (B, L) = ({batch}, {length}), got {tuple(position_ids.shape)}"
            )
        num_meta = self.num_query_tokens + self.num_candidate_tokens
        planes = position_ids if position_ids.ndim == 3 else position_ids.unsqueeze(0)
        masked = torch.where(valid.unsqueeze(0), planes, torch.full_like(planes, -1))
        start = masked.amax(dim=(0, 2)) + 1  # (B,)
        meta = start[:, None] + torch.arange(num_meta, device=planes.device)  # (B, R)
        out = torch.stack([lengthen(p, meta) for p in planes.unbind(0)], dim=0)
        return out if position_ids.ndim == 3 else out[0]

    def _rope_index(self, model, ids_ext, mask_ext, call, inputs):
        """3-D M-RoPE positions of the lengthened sequence from the backbone's own
        ``get_rope_index``: meta tokens are text, so they follow the image/video grid."""
        accepted, takes_kwargs = _accepted_parameters(model.get_rope_index)
        arguments = {"input_ids": ids_ext, "attention_mask": mask_ext}
        for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if inputs.get(name) is not None and (name in accepted or takes_kwargs):
                arguments[name] = inputs[name]
        if "mm_token_type_ids" in accepted:
            if "mm_token_type_ids" not in call:
                raise ValueError(
                    "mm_token_type_ids is required with image/video inputs for this backbone "
                    "(transformers >= 5 processors return it alongside input_ids)"
                )
            arguments["mm_token_type_ids"] = call["mm_token_type_ids"]
        position_ids, _ = model.get_rope_index(**arguments)
        return position_ids

    # ----------------------------------------------------------------------------------
    # training and scoring
    # ----------------------------------------------------------------------------------
    def forward(
        self,
        queries: Mapping,
        candidates: Mapping,
        hard_negatives: Optional[Mapping] = None,
        *,
        labels: Optional[torch.Tensor] = None,
    ) -> MetaEmbedOutput:
        """Matryoshka InfoNCE loss of a batch.

        Args:
            queries: tokenizer/processor outputs of B queries.
            candidates: outputs for the in-batch candidates (B' of them; query a's positive
                is candidate ``labels[a]``, default a).
            hard_negatives: optional outputs for B * K hard negatives, query-major: rows
                a*K ... a*K + K - 1 belong to query a and are scored against it only.
            labels: optional (B,) int64 positive index into ``candidates``.
        """
        for name, value in (("queries", queries), ("candidates", candidates)):
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a mapping of model inputs, got {type(value).__name__}")
        q = self.encode_queries(**queries)
        c = self.encode_candidates(**candidates)
        hn = None
        if hard_negatives is not None:
            if not isinstance(hard_negatives, Mapping):
                raise TypeError(
                    f"hard_negatives must be a mapping of model inputs, got {type(hard_negatives).__name__}"
                )
            flat = self.encode_candidates(**hard_negatives)
            if flat.shape[0] % q.shape[0] != 0:
                raise ValueError(
                    f"hard_negatives must hold K rows per query (B * K = multiple of {q.shape[0]}), "
                    f"got {flat.shape[0]}"
                )
            hn = flat.view(q.shape[0], flat.shape[0] // q.shape[0], *flat.shape[1:])
        loss = self.loss_fn(q, c, hn, labels=labels)
        return MetaEmbedOutput(loss, q, c, hn)

    def score(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        budget: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """(Nq, Nc) late-interaction scores at the test-time budget (r_q, r_c): the first r_q
        query vectors against the first r_c candidate vectors. None = full (R_q, R_c)."""
        budget = V.normalize_groups(
            None if budget is None else [budget], query_embeddings.shape[1], candidate_embeddings.shape[1]
        )[0]
        r_q, r_c = budget
        return maxsim(query_embeddings[:, :r_q].contiguous(), candidate_embeddings[:, :r_c].contiguous())

    # ----------------------------------------------------------------------------------
    # gradient checkpointing, persistence
    # ----------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Checkpoint the backbone's layers (the meta tokens make ``inputs_embeds`` require
        grad, so even reentrant checkpointing sees a differentiable input)."""
        model = _unwrap_peft(self.backbone)
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def _wrapper_config(self) -> dict:
        inner = _unwrap_peft(self.backbone)
        return {
            "format_version": _FORMAT_VERSION,
            "num_query_tokens": self.num_query_tokens,
            "num_candidate_tokens": self.num_candidate_tokens,
            "dim": self.projection.out_features if self.projection is not None else None,
            "normalize": self.normalize,
            "groups": [list(g) for g in self.groups],
            "temperature": self.loss_fn.temperature,
            "group_weights": None if self.loss_fn.weights is None else list(self.loss_fn.weights),
            "hidden_size": self.hidden_size,
            "backbone_class": type(inner).__name__,
            "backbone_is_peft": inner is not self.backbone,
        }

    def _wrapper_state(self) -> Dict[str, torch.Tensor]:
        state = {"meta_tokens": self.meta_tokens.detach().contiguous().cpu()}
        if self.projection is not None:
            state["projection.weight"] = self.projection.weight.detach().contiguous().cpu()
        return state

    def save_pretrained(self, save_directory: str, **backbone_kwargs) -> None:
        """Save the backbone (``backbone.save_pretrained``: full weights, or only the adapter
        for a PEFT model) and, next to it, the wrapper's config and weights (meta tokens,
        projection) as ``metaembed_config.json`` and ``metaembed.safetensors``."""
        from safetensors.torch import save_file

        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
        os.makedirs(save_directory, exist_ok=True)
        self.backbone.save_pretrained(save_directory, **backbone_kwargs)
        save_file(self._wrapper_state(), os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(self._wrapper_config(), f, indent=2)

    @classmethod
    def from_pretrained(
        cls, directory: str, backbone: Optional[nn.Module] = None, **backbone_kwargs
    ) -> "MetaEmbed":
        """Load what ``save_pretrained`` wrote.

        Args:
            directory: the save directory.
            backbone: optional already-built backbone. For a PEFT save, this is the base
                model the adapter is loaded onto (default: the adapter config's
                ``base_model_name_or_path``). Otherwise the backbone is loaded from
                ``directory`` with the transformers class it was saved from.
            backbone_kwargs: passed to the backbone's ``from_pretrained`` (e.g. torch_dtype).
        """
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"directory {directory!r} holds no {CONFIG_NAME}: not a MetaEmbed save")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported MetaEmbed save format {config.get('format_version')!r}")

        if config["backbone_is_peft"]:
            from peft import PeftModel

            if backbone is None:
                with open(os.path.join(directory, "adapter_config.json")) as f:
                    base_path = json.load(f)["base_model_name_or_path"]
                backbone = cls._load_transformers_model(config["backbone_class"], base_path, backbone_kwargs)
            backbone = PeftModel.from_pretrained(backbone, directory)
        elif backbone is None:
            backbone = cls._load_transformers_model(config["backbone_class"], directory, backbone_kwargs)

        model = cls(
            backbone,
            num_query_tokens=config["num_query_tokens"],
            num_candidate_tokens=config["num_candidate_tokens"],
            dim=config["dim"],
            normalize=config["normalize"],
            groups=[tuple(g) for g in config["groups"]],
            temperature=config["temperature"],
            group_weights=config["group_weights"],
        )
        if model.hidden_size != config["hidden_size"]:
            raise ValueError(
                f"backbone hidden size {model.hidden_size} does not match the saved {config['hidden_size']}"
            )
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        with torch.no_grad():
            model.meta_tokens.copy_(state["meta_tokens"])
            if model.projection is not None:
                model.projection.weight.copy_(state["projection.weight"])
        return model

    @staticmethod
    def _load_transformers_model(class_name: str, path: str, kwargs: dict) -> nn.Module:
        import transformers

        model_class = getattr(transformers, class_name, None)
        if model_class is None:
            raise ValueError(
                f"transformers has no class {class_name!r}; pass the backbone to from_pretrained"
            )
        return model_class.from_pretrained(path, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_query_tokens={self.num_query_tokens}, num_candidate_tokens={self.num_candidate_tokens}, "
            f"output_dim={self.output_dim}, normalize={self.normalize}, groups={self.groups}"
        )
