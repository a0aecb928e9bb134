"""Conversion between polymodal and foreign checkpoint formats (open_clip, Hugging Face CLIP and SigLIP).

Every conversion is an explicit table of key prefixes, read in both directions, plus the few
tensor reshapes the formats need (transposed projections, separate or fused q/k/v, SigLIP's
one-element logit scale, Siglip2's flattened-patch embedding). Configs are translated by
``convert_configs`` and ``convert_siglip``, against the field tables of ``convert_fields``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from polymodal.encoders.layers import to_pair

from .checkpoint import CheckpointError
from .config import ModelConfig
from .convert_coca import split_open_clip_coca
from .convert_configs import (
    config_from_hf_clip,
    config_from_open_clip,
    has_hf_tokenizer,
    hf_config_from,
    open_clip_model_cfg,
    read_hf_preprocess,
    tower_arg,
)
from .convert_siglip import SIGLIP_MODEL_TYPES, config_from_hf_siglip, is_siglip_shaped, siglip_config_from

__all__ = [
    "HF_MODEL_TYPES",
    "config_from_hf",
    "config_from_open_clip",
    "has_hf_tokenizer",
    "hf_config_from",
    "hf_model_type",
    "hf_to_polymodal",
    "looks_like_hf_clip",
    "looks_like_open_clip",
    "open_clip_model_cfg",
    "open_clip_to_polymodal",
    "polymodal_to_hf",
    "polymodal_to_open_clip",
    "read_hf_preprocess",
    "resize_hints",
    "siglip_config_from",
    "to_polymodal_state",
]

# The Hugging Face ``model_type`` values polymodal imports.
HF_MODEL_TYPES = ("clip", *SIGLIP_MODEL_TYPES)

# (foreign, polymodal) key prefixes. "{}" stands for a layer index; a trailing "$" matches the whole key.
Rule = tuple[str, str]

_OPEN_CLIP_BLOCK = [
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight$", "attn.qkv.weight$"),
    ("attn.in_proj_bias$", "attn.qkv.bias$"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("ls_1.", "ls1."),
    ("ls_2.", "ls2."),
]
_HF_BLOCK = [
    ("layer_norm1.", "norm1."),
    ("self_attn.qkv.", "attn.qkv."),
    ("self_attn.out_proj.", "attn.proj."),
    ("layer_norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
# Keys some checkpoints carry that hold no weights.
_IGNORED = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask|position_ids)$")


def _blocks(foreign: str, ours: str, table: list[Rule]) -> list[Rule]:
    return [(f"{foreign}{{}}.{f}", f"{ours}{{}}.{o}") for f, o in table]


def _open_clip_rules(image_type: str, text_type: str = "text_transformer") -> list[Rule]:
    # open_clip's HFTextEncoder: the transformers model and open_clip's projection (under "text.", stripped)
    hf_text = [("transformer.", "towers.text.transformer."), ("proj.", "towers.text.proj.")]
    rules: list[Rule] = [
        *(hf_text if text_type == "hf_text" else []),
        ("token_embedding.", "towers.text.token_embedding."),
        ("positional_embedding$", "towers.text.pos_embed$"),
        ("ln_final.", "towers.text.norm."),
        ("text_projection$", "towers.text.proj.weight$"),
        ("text_projection.", "towers.text.proj."),
        ("logit_scale$", "alignment.logit_scale$"),
        ("logit_bias$", "alignment.logit_bias$"),
        *_blocks("transformer.resblocks.", "towers.text.transformer.blocks.", _OPEN_CLIP_BLOCK),
    ]
    if image_type == "vit":
        rules += [
            ("visual.class_embedding$", "towers.image.cls_token$"),
            ("visual.positional_embedding$", "towers.image.pos_embed$"),
            ("visual.conv1.", "towers.image.patch_embed."),
            ("visual.ln_pre.", "towers.image.norm_pre."),
            ("visual.ln_post.", "towers.image.norm."),
            ("visual.proj$", "towers.image.proj.weight$"),
            *_blocks("visual.transformer.resblocks.", "towers.image.transformer.blocks.", _OPEN_CLIP_BLOCK),
        ]
    elif image_type == "timm":  # open_clip's TimmModel: the timm trunk, then its own head
        rules += [
            ("visual.trunk.", "towers.image.trunk."),
            ("visual.head.proj.", "towers.image.proj."),
            ("visual.head.mlp.fc1.", "towers.image.proj.0."),
            ("visual.head.mlp.fc2.", "towers.image.proj.2."),
        ]
    elif image_type == "modified_resnet":
        rules += [
            ("visual.attnpool.positional_embedding$", "towers.image.attnpool.pos_embed$"),
            ("visual.attnpool.qkv.", "towers.image.attnpool.qkv."),
            ("visual.attnpool.c_proj.", "towers.image.attnpool.proj."),
            ("visual.", "towers.image."),  # the ResNet body keeps open_clip's names
        ]
    else:
        raise CheckpointError(
            f"open_clip conversion supports 'vit', 'timm' and 'modified_resnet' image towers, not {image_type!r}"
        )
    return rules


def _hf_rules(model_type: str) -> list[Rule]:
    """The key table of Hugging Face ``model_type``: ``"clip"``, or ``"siglip"`` (Siglip2 has the same keys)."""
    rules: list[Rule] = [
        ("text_model.embeddings.token_embedding.", "towers.text.token_embedding."),
        ("text_model.embeddings.position_embedding.weight$", "towers.text.pos_embed$"),
        ("text_model.final_layer_norm.", "towers.text.norm."),
        ("vision_model.embeddings.patch_embedding.", "towers.image.patch_embed."),
        ("vision_model.embeddings.position_embedding.weight$", "towers.image.pos_embed$"),
        ("vision_model.post_layernorm.", "towers.image.norm."),
        ("logit_scale$", "alignment.logit_scale$"),
        *_blocks("text_model.encoder.layers.", "towers.text.transformer.blocks.", _HF_BLOCK),
        *_blocks("vision_model.encoder.layers.", "towers.image.transformer.blocks.", _HF_BLOCK),
    ]
    if model_type == "siglip":
        # the text head, the image attention-pooling head (its in_proj split into q and kv by _siglip_in), the bias
        return rules + [
            ("text_model.head.", "towers.text.proj."),
            ("vision_model.head.probe$", "towers.image.attn_pool.probe$"),
            ("vision_model.head.attention.q.", "towers.image.attn_pool.attn.q."),
            ("vision_model.head.attention.kv.", "towers.image.attn_pool.attn.kv."),
            ("vision_model.head.attention.out_proj.", "towers.image.attn_pool.attn.proj."),
            ("vision_model.head.layernorm.", "towers.image.attn_pool.norm."),
            ("vision_model.head.mlp.", "towers.image.attn_pool.mlp."),
            ("logit_bias$", "alignment.logit_bias$"),
        ]
    return rules + [
        ("text_projection.", "towers.text.proj."),
        ("vision_model.embeddings.class_embedding$", "towers.image.cls_token$"),
        ("vision_model.pre_layrnorm.", "towers.image.norm_pre."),
        ("visual_projection.", "towers.image.proj."),
    ]


def _pattern(template: str) -> re.Pattern:
    exact = template.endswith("$")
    body = re.escape(template.rstrip("$")).replace(r"\{\}", r"(\d+)")
    return re.compile("^" + body + ("$" if exact else ""))


def _rename(state: dict[str, torch.Tensor], rules: list[Rule], reverse: bool) -> dict[str, torch.Tensor]:
    """Rename keys by the first matching rule; keys no rule matches are kept, so strict loading names them."""
    compiled = [(_pattern(o if reverse else f), (f if reverse else o).rstrip("$")) for f, o in rules]
    out = {}
    for key, value in state.items():
        if _IGNORED.search(key):
            continue
        new = key
        for pattern, template in compiled:
            m = pattern.match(key)
            if m:
                new = template.format(*m.groups()) + key[m.end() :]
                break
        out[new] = value
    return out


def _fuse_qkv(state: dict[str, torch.Tensor], names: tuple[str, str, str], fused: str) -> dict[str, torch.Tensor]:
    """Concatenate separate q/k/v projections (``...q_proj.weight``) into one ``...{fused}.weight``."""
    out = dict(state)
    for key in list(state):
        if f".{names[0]}." not in key:
            continue
        parts = [key.replace(f".{names[0]}.", f".{n}.") for n in names]
        if all(p in state for p in parts):
            out[key.replace(f".{names[0]}.", f".{fused}.")] = torch.cat([state[p] for p in parts], dim=0)
            for p in parts:
                del out[p]
    return out


def _split_qkv(state: dict[str, torch.Tensor], names: tuple[str, str, str], fused: str) -> dict[str, torch.Tensor]:
    out = dict(state)
    for key in list(state):
        if f".{fused}." in key:
            for n, chunk in zip(names, state[key].chunk(3, dim=0)):
                out[key.replace(f".{fused}.", f".{n}.")] = chunk.clone()
            del out[key]
    return out


def _transpose(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: (v.t().contiguous() if k in keys else v) for k, v in state.items()}


# ----------------------------------------------------------------------------------------- open_clip


def open_clip_to_polymodal(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Translate an open_clip CLIP state dict to polymodal keys for a model built from ``config``."""
    rest, coca = split_open_clip_coca(state)
    if coca:  # a CoCa: convert_coca maps its own tensors, the rest is CLIP's
        return {**open_clip_to_polymodal(rest, config), **coca}
    image_type = config.towers["image"].type
    # CustomTextCLIP (custom_text) keeps the same text tower under "text."; CLIP flattens it onto the model
    state = {k.removeprefix("text."): v for k, v in state.items()}
    state = _fuse_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")  # ResNet attention pool
    state = _transpose(state, ("visual.proj", "text_projection"))
    return _rename(state, _open_clip_rules(image_type, config.towers["text"].type), reverse=False)


def polymodal_to_open_clip(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Translate a polymodal CLIP state dict to the keys open_clip's ``CLIP`` model loads."""
    image_type = config.towers["image"].type
    state = dict(state)
    linear = {}
    if "towers.text.proj.bias" in state:  # with a bias open_clip's text projection is an nn.Linear, untransposed
        linear = {f"text_projection.{p}": state.pop(f"towers.text.proj.{p}") for p in ("weight", "bias")}
    state = _rename(state, _open_clip_rules(image_type), reverse=True)
    state = _split_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")
    state = _transpose(state, ("visual.proj", "text_projection"))
    # open_clip keeps bias-free projections as bare parameters: ".weight" was renamed away with the rule
    return {**state, **linear}


def looks_like_open_clip(state: dict[str, torch.Tensor]) -> bool:
    """open_clip's ``CLIP`` or ``CustomTextCLIP`` (its text tower, its own or a Hugging Face one, under ``text.``)
    state dict."""
    text = "token_embedding.weight" in state or any(k.startswith("text.") for k in state)
    return text and any(k.startswith("visual.") for k in state)


def looks_like_hf_clip(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has Hugging Face CLIP's (or SigLIP's, which shares its layout) two towers."""
    return any(k.startswith("vision_model.") for k in state) and any(k.startswith("text_model.") for k in state)


# ------------------------------------------------------------------------------------- Hugging Face


_HF_PROBE = "vision_model.head.probe"
_HF_IN_PROJ = "vision_model.head.attention.in_proj_"
_HF_PATCH = "vision_model.embeddings.patch_embedding.weight"
_HF_SCALARS = ("logit_scale", "logit_bias")


def config_from_hf(hf: dict[str, Any], name: str | None = None) -> ModelConfig:
    """Build a polymodal config from a Hugging Face ``config.json`` of one of ``HF_MODEL_TYPES``
    (``CLIPConfig``, ``SiglipConfig``, ``Siglip2Config``); see ``config_from_hf_clip`` / ``config_from_hf_siglip``."""
    kind = hf.get("model_type")
    if kind == "clip":
        return config_from_hf_clip(hf, name or "hf-clip")
    if kind in SIGLIP_MODEL_TYPES:
        return config_from_hf_siglip(hf, name or f"hf-{kind}")
    raise CheckpointError(f"expected a Hugging Face config with model_type one of {HF_MODEL_TYPES}, got {kind!r}")


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face ``model_type`` a polymodal config exports as: ``"siglip"`` with SigLIP's image head,
    else ``"clip"``."""
    return "siglip" if is_siglip_shaped(config) else "clip"


def _patch_conv_weight(weight: torch.Tensor, config: ModelConfig | None) -> torch.Tensor:
    """Siglip2's Linear over flattened ``(p, p, C)`` patches as the equal ``(D, C, p, p)`` convolution weight.

    Channels and patch size come from ``config`` when given; else from the width alone, which tells
    them apart for 1 or 3 channels only (``p * p`` is a square, ``3 * p * p`` never is).
    """
    D, K = weight.shape
    image = config.towers.get("image") if config is not None else None
    if image is not None and image.type == "vit":
        channels, (ph, pw) = tower_arg(image, "in_chans"), to_pair(tower_arg(image, "patch_size"))
    else:
        channels = next((c for c in (3, 1) if K % c == 0 and math.isqrt(K // c) ** 2 == K // c), None)
        if channels is None:
            raise CheckpointError(
                f"{_HF_PATCH} embeds {K} values per patch, which is not 3 * p * p or p * p; give the model's "
                "config (load through the model directory) to say its channels and patch size"
            )
        ph = pw = math.isqrt(K // channels)
    if channels * ph * pw != K:
        raise CheckpointError(
            f"{_HF_PATCH} embeds {K} values per patch, but the model's patches hold {channels} x {ph} x {pw}"
        )
    return weight.reshape(D, ph, pw, channels).permute(0, 3, 1, 2).contiguous()  # (D, C, ph, pw)


def _siglip_in(state: dict[str, torch.Tensor], config: ModelConfig | None) -> dict[str, torch.Tensor]:
    """SigLIP's tensors in the shapes polymodal keeps (before renaming); CLIP's pass through unchanged."""
    out = dict(state)
    if _HF_PROBE in out:
        out[_HF_PROBE] = out[_HF_PROBE].reshape(-1)  # (1, 1, D) -> (D,)
        out.update({k: v.reshape(()) for k, v in out.items() if k in _HF_SCALARS and v.shape == (1,)})
    for part in ("weight", "bias"):
        fused = out.pop(_HF_IN_PROJ + part, None)
        if fused is not None:  # nn.MultiheadAttention's (q; k; v) rows: the probe's q, the tokens' fused kv
            width = fused.shape[0] // 3
            out[f"vision_model.head.attention.q.{part}"] = fused[:width]
            out[f"vision_model.head.attention.kv.{part}"] = fused[width:]
    if _HF_PATCH in out and out[_HF_PATCH].ndim == 2:
        out[_HF_PATCH] = _patch_conv_weight(out[_HF_PATCH], config)
    return out


def _siglip_out(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    out[_HF_PROBE] = out[_HF_PROBE].reshape(1, 1, -1)
    out.update({k: out[k].reshape(1) for k in _HF_SCALARS})
    for part in ("weight", "bias"):
        q, kv = out.pop(f"vision_model.head.attention.q.{part}"), out.pop(f"vision_model.head.attention.kv.{part}")
        out[_HF_IN_PROJ + part] = torch.cat([q, kv], dim=0)
    return out


def hf_to_polymodal(state: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP, SigLIP or Siglip2 state dict in polymodal keys; ``config``, the model's, is needed
    only to reshape a Siglip2 patch embedding of other than 1 or 3 channels (see ``_patch_conv_weight``)."""
    model_type = "siglip" if _HF_PROBE in state else "clip"
    state = _fuse_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")
    return _rename(_siglip_in(state, config), _hf_rules(model_type), reverse=False)


def polymodal_to_hf(state: dict[str, torch.Tensor], model_type: str = "clip") -> dict[str, torch.Tensor]:
    """A polymodal state dict in the keys of Hugging Face ``model_type`` (``"clip"`` or ``"siglip"``)."""
    state = _split_qkv(_rename(state, _hf_rules(model_type), reverse=True), ("q_proj", "k_proj", "v_proj"), "qkv")
    return _siglip_out(state) if model_type == "siglip" else state


def to_polymodal_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """``state`` in polymodal keys, whichever supported format (polymodal, open_clip, HF CLIP/SigLIP) it is in."""
    if looks_like_hf_clip(state):
        return hf_to_polymodal(state, config)
    if looks_like_open_clip(state):
        if "image" not in config.towers:
            raise CheckpointError("an open_clip CLIP checkpoint needs an image-text model")
        return open_clip_to_polymodal(state, config)
    return state


# ------------------------------------------------------------------------------------ resized towers


def resize_hints(state: dict[str, torch.Tensor], config: ModelConfig) -> list[tuple[str, str | None]]:
    """Why ``state`` (polymodal keys) does not fit ``config`` when a tower was built for another input
    size: ``(what differs, the override that fits)`` per positional table of another length, e.g.
    ``("... 50 tokens (7x7 grid = image_size 224 at patch 32) but the model's has 10 ...",
    "image.image_size=224")``; the override is ``None`` when no size fits. Empty when every table fits."""
    hints = []
    image, text = config.towers.get("image"), config.towers.get("text")
    if image is not None and image.type == "vit" and "towers.image.pos_embed" in state:
        prefix = 1 if tower_arg(image, "class_token") else 0
        patch = to_pair(tower_arg(image, "patch_size"))
        size = to_pair(tower_arg(image, "image_size"))
        hints += _grid_hint(state["towers.image.pos_embed"].shape[0], prefix, patch, size, f"patch {patch[0]}")
    if image is not None and image.type == "modified_resnet" and "towers.image.attnpool.pos_embed" in state:
        stride = (32, 32)  # the ResNet's four stages and stem downsample 32 times
        size = to_pair(tower_arg(image, "image_size"))
        hints += _grid_hint(state["towers.image.attnpool.pos_embed"].shape[0], 1, stride, size, "stride 32")
    if text is not None and text.type == "text_transformer" and "towers.text.pos_embed" in state:
        length, expected = state["towers.text.pos_embed"].shape[0], tower_arg(text, "context_length")
        if length != expected:
            hints.append(
                (
                    f"the checkpoint's text positional embedding has {length} positions but the model's has {expected}",
                    f"text.context_length={length}",
                )
            )
    return hints


def _grid_hint(
    tokens: int, prefix: int, patch: tuple[int, int], size: tuple[int, int], step: str
) -> list[tuple[str, str | None]]:
    grid = (size[0] // patch[0], size[1] // patch[1])
    expected = prefix + grid[0] * grid[1]
    if tokens == expected:
        return []
    side = math.isqrt(tokens - prefix) if tokens > prefix else 0
    model = f"{expected} ({grid[0]}x{grid[1]} grid, image_size {_size_text(size)})"
    if side * side != tokens - prefix or patch[0] != patch[1]:
        return [
            (
                f"the checkpoint's image positional embedding has {tokens} tokens (not a square grid); "
                f"the model's has {model}",
                None,
            )
        ]
    fitting = side * patch[0]
    reason = (
        f"the checkpoint's image positional embedding has {tokens} tokens ({side}x{side} grid = image_size "
        f"{fitting} at {step}) but the model's has {model}"
    )
    return [(reason, f"image.image_size={fitting}")]


def _size_text(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{list(size)}"
