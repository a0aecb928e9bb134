"""Conversion between polymodal and foreign checkpoint formats (open_clip, Hugging Face CLIP).

Every conversion is an explicit table of key prefixes, read in both directions, plus the few
tensor reshapes the formats need (transposed projections, separate or fused q/k/v).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import ComponentConfig, ModelConfig, PreprocessConfig, TokenizerConfig

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


def _open_clip_rules(image_type: str) -> list[Rule]:
    rules: list[Rule] = [
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
    elif image_type == "modified_resnet":
        rules += [
            ("visual.attnpool.positional_embedding$", "towers.image.attnpool.pos_embed$"),
            ("visual.attnpool.qkv.", "towers.image.attnpool.qkv."),
            ("visual.attnpool.c_proj.", "towers.image.attnpool.proj."),
            ("visual.", "towers.image."),  # the ResNet body keeps open_clip's names
        ]
    else:
        raise CheckpointError(
            f"open_clip conversion supports 'vit' and 'modified_resnet' image towers, not {image_type!r}"
        )
    return rules


def _hf_rules() -> list[Rule]:
    return [
        ("text_model.embeddings.token_embedding.", "towers.text.token_embedding."),
        ("text_model.embeddings.position_embedding.weight$", "towers.text.pos_embed$"),
        ("text_model.final_layer_norm.", "towers.text.norm."),
        ("text_projection.", "towers.text.proj."),
        ("vision_model.embeddings.class_embedding$", "towers.image.cls_token$"),
        ("vision_model.embeddings.patch_embedding.", "towers.image.patch_embed."),
        ("vision_model.embeddings.position_embedding.weight$", "towers.image.pos_embed$"),
        ("vision_model.pre_layrnorm.", "towers.image.norm_pre."),
        ("vision_model.post_layernorm.", "towers.image.norm."),
        ("visual_projection.", "towers.image.proj."),
        ("logit_scale$", "alignment.logit_scale$"),
        *_blocks("text_model.encoder.layers.", "towers.text.transformer.blocks.", _HF_BLOCK),
        *_blocks("vision_model.encoder.layers.", "towers.image.transformer.blocks.", _HF_BLOCK),
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
    image_type = config.towers["image"].type
    state = _fuse_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")  # ResNet attention pool
    state = _transpose(state, ("visual.proj", "text_projection"))
    return _rename(state, _open_clip_rules(image_type), reverse=False)


def polymodal_to_open_clip(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Translate a polymodal CLIP state dict to the keys open_clip's ``CLIP`` model loads."""
    image_type = config.towers["image"].type
    state = _rename(state, _open_clip_rules(image_type), reverse=True)
    state = _split_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")
    state = _transpose(state, ("visual.proj", "text_projection"))
    # open_clip keeps the projections as bare parameters: ".weight" was renamed away with the rule
    return state


def looks_like_open_clip(state: dict[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in state and any(k.startswith("visual.") for k in state)


def looks_like_hf_clip(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("vision_model.") for k in state) and any(k.startswith("text_model.") for k in state)


def open_clip_model_cfg(config: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` (as in its ``model_configs/*.json``) of a polymodal CLIP config."""
    _require_clip_shape(config, image_types=("vit", "modified_resnet"))
    img, txt = config.towers["image"].args, config.towers["text"].args
    if config.towers["image"].type == "vit":
        vision = {
            "image_size": img.get("image_size", 224),
            "layers": img.get("layers", 12),
            "width": img.get("width", 768),
            "patch_size": img.get("patch_size", 16),
            "mlp_ratio": img.get("mlp_ratio", 4.0),
        }
        vision["head_width"] = vision["width"] // img.get("heads", 12)
        if img.get("pool_type", "cls") == "mean":
            vision["pool_type"] = "avg"
    else:
        vision = {
            "image_size": img.get("image_size", 224),
            "layers": list(img.get("layers", (3, 4, 6, 3))),
            "width": img.get("width", 64),
        }
        vision["head_width"] = vision["width"] * 32 // img.get("heads", 32)
    text = {
        "context_length": txt.get("context_length", 77),
        "vocab_size": txt.get("vocab_size", 49408),
        "width": txt.get("width", 512),
        "heads": txt.get("heads", 8),
        "layers": txt.get("layers", 12),
        "mlp_ratio": txt.get("mlp_ratio", 4.0),
    }
    acts = {img.get("act_layer", "gelu"), txt.get("act_layer", "gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise CheckpointError(f"open_clip needs both towers to use 'gelu' or both 'quick_gelu', got {sorted(acts)}")
    cfg = {"embed_dim": config.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if acts == {"quick_gelu"}:
        cfg["quick_gelu"] = True
    if config.init_logit_bias is not None:
        cfg["init_logit_bias"] = config.init_logit_bias
    return cfg


# ------------------------------------------------------------------------------------- Hugging Face

_HF_ACTS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def hf_to_polymodal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _fuse_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")
    return _rename(state, _hf_rules(), reverse=False)


def polymodal_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _rename(state, _hf_rules(), reverse=True)
    return _split_qkv(state, ("q_proj", "k_proj", "v_proj"), "qkv")


def config_from_hf(hf: dict[str, Any], name: str = "hf-clip") -> ModelConfig:
    """Build a polymodal config from a Hugging Face ``CLIPConfig`` dict (its ``config.json``)."""
    if hf.get("model_type") != "clip":
        raise CheckpointError(f"expected a Hugging Face CLIP config (model_type 'clip'), got {hf.get('model_type')!r}")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    defaults_t = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    defaults_v = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    t = {**defaults_t, **{k: val for k, val in t.items() if val is not None}}
    v = {**defaults_v, **{k: val for k, val in v.items() if val is not None}}
    embed_dim = hf.get("projection_dim", 512)
    for part, act in (("text", t["hidden_act"]), ("vision", v["hidden_act"])):
        if act not in _HF_ACTS:
            raise CheckpointError(f"unsupported {part} activation {act!r}; supported: {sorted(_HF_ACTS)}")
    eos = t["eos_token_id"]
    text_args = {
        "vocab_size": t["vocab_size"],
        "context_length": t["max_position_embeddings"],
        "width": t["hidden_size"],
        "layers": t["num_hidden_layers"],
        "heads": t["num_attention_heads"],
        "mlp_ratio": t["intermediate_size"] / t["hidden_size"],
        "output_dim": embed_dim,
        "act_layer": _HF_ACTS[t["hidden_act"]],
        "norm_eps": t["layer_norm_eps"],
        # HF pools at the highest id for configs written before eos_token_id was fixed (eos == 2)
        "pool_type": "argmax" if eos == 2 else "eos",
        "eos_token_id": None if eos == 2 else eos,
        "pad_token_id": t["pad_token_id"] if t["pad_token_id"] is not None else 0,
    }
    vision_args = {
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "in_chans": v["num_channels"],
        "width": v["hidden_size"],
        "layers": v["num_hidden_layers"],
        "heads": v["num_attention_heads"],
        "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
        "output_dim": embed_dim,
        "act_layer": _HF_ACTS[v["hidden_act"]],
        "norm_eps": v["layer_norm_eps"],
    }
    return ModelConfig(
        name=name,
        towers={
            "image": ComponentConfig("vit", vision_args),
            "text": ComponentConfig("text_transformer", text_args),
        },
        embed_dim=embed_dim,
        init_logit_scale=hf.get("logit_scale_init_value", math.log(1 / 0.07)),
        tokenizer=TokenizerConfig("clip", t["max_position_embeddings"]),
        preprocess=PreprocessConfig(image_size=v["image_size"]),
    )


def hf_config_from(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``CLIPConfig`` keyword arguments equivalent to a polymodal CLIP config."""
    _require_clip_shape(config, image_types=("vit",))
    img, txt = config.towers["image"].args, config.towers["text"].args
    inverse_acts = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
    for part, args in (("image", img), ("text", txt)):
        act = args.get("act_layer", "gelu")
        if act not in inverse_acts:
            raise CheckpointError(f"the {part} tower's activation {act!r} has no Hugging Face CLIP equivalent")
        if args.get("ls_init_value") or args.get("norm_layer", "layernorm") != "layernorm":
            raise CheckpointError(f"the {part} tower uses LayerScale or a non-LayerNorm norm, which HF CLIP lacks")
    if (
        img.get("pool_type", "cls") != "cls"
        or not img.get("pre_norm", True)
        or img.get("proj_bias")
        or img.get("patch_bias")
        or txt.get("proj_bias")
        or not txt.get("causal", True)
    ):
        raise CheckpointError("HF CLIP needs class-token pooling, a pre-norm, causal text and bias-free projections")
    if config.init_logit_bias is not None:
        raise CheckpointError("HF CLIPModel has no logit bias; this model was configured for the sigmoid loss")
    text_pool = txt.get("pool_type", "argmax")
    if text_pool not in ("argmax", "eos"):
        raise CheckpointError(f"HF CLIP pools text at the end-of-text token, not with {text_pool!r}")
    width_t, width_v = txt.get("width", 512), img.get("width", 768)
    patch, size = img.get("patch_size", 16), img.get("image_size", 224)
    if not isinstance(patch, int) or not isinstance(size, int):
        raise CheckpointError("HF CLIP needs a square image_size and patch_size")
    return {
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "text_config": {
            "vocab_size": txt.get("vocab_size", 49408),
            "hidden_size": width_t,
            "intermediate_size": round(width_t * txt.get("mlp_ratio", 4.0)),
            "num_hidden_layers": txt.get("layers", 12),
            "num_attention_heads": txt.get("heads", 8),
            "max_position_embeddings": txt.get("context_length", 77),
            "hidden_act": inverse_acts[txt.get("act_layer", "gelu")],
            "layer_norm_eps": txt.get("norm_eps", 1e-5),
            "eos_token_id": 2 if text_pool == "argmax" else txt["eos_token_id"],
            "pad_token_id": txt.get("pad_token_id", 0),
            "projection_dim": config.embed_dim,
        },
        "vision_config": {
            "hidden_size": width_v,
            "intermediate_size": round(width_v * img.get("mlp_ratio", 4.0)),
            "num_hidden_layers": img.get("layers", 12),
            "num_attention_heads": img.get("heads", 12),
            "num_channels": img.get("in_chans", 3),
            "image_size": size,
            "patch_size": patch,
            "hidden_act": inverse_acts[img.get("act_layer", "gelu")],
            "layer_norm_eps": img.get("norm_eps", 1e-5),
            "projection_dim": config.embed_dim,
        },
    }


def _require_clip_shape(config: ModelConfig, image_types: tuple[str, ...]) -> None:
    if config.kind != "contrastive" or set(config.towers) != {"image", "text"}:
        raise CheckpointError(
            f"only image-text contrastive models can be exported to CLIP formats; "
            f"{config.name!r} has towers {sorted(config.towers)}"
        )
    if config.towers["image"].type not in image_types or config.towers["text"].type != "text_transformer":
        raise CheckpointError(
            f"this format needs a {' or '.join(image_types)} image tower and a text_transformer "
            f"text tower, got {config.towers['image'].type} and {config.towers['text'].type}"
        )
    text_out = config.towers["text"].args.get("output_dim", 512)
    image_out = config.towers["image"].args.get("output_dim", 512)
    if text_out != config.embed_dim or image_out != config.embed_dim:
        raise CheckpointError(
            "CLIP formats keep the projection inside each tower: both towers' output_dim must "
            f"equal embed_dim {config.embed_dim}, got image {image_out} and text {text_out}"
        )


def read_hf_preprocess(directory: Path) -> PreprocessConfig | None:
    """Mean, std and size from a Hugging Face ``preprocessor_config.json``, when the directory has one."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data = data.get("image_processor", data)
    size = data.get("crop_size") or data.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return PreprocessConfig(image_size=size, mean=data.get("image_mean"), std=data.get("image_std"))


def config_from_open_clip(
    model_cfg: dict[str, Any], name: str = "open-clip", preprocess: dict[str, Any] | None = None
) -> ModelConfig:
    """Build a polymodal config from an open_clip ``model_cfg`` (standard ViT or modified-ResNet CLIP)."""
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    exotic = sorted(
        k for k in ("timm_model_name", "hf_model_name", "attentional_pool", "no_ln_pre") if v.get(k) or t.get(k)
    )
    if exotic or model_cfg.get("custom_text"):
        raise CheckpointError(f"open_clip configs with {exotic or ['custom_text']} are not supported for import")
    embed_dim = model_cfg["embed_dim"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    size = v.get("image_size", 224)
    if isinstance(v.get("layers", 12), (list, tuple)):
        width = v.get("width", 64)
        image = ComponentConfig(
            "modified_resnet",
            {
                "layers": list(v["layers"]),
                "width": width,
                "heads": width * 32 // v.get("head_width", 64),
                "image_size": size,
                "output_dim": embed_dim,
            },
        )
    else:
        width = v.get("width", 768)
        image = ComponentConfig(
            "vit",
            {
                "image_size": size,
                "patch_size": v.get("patch_size", 16),
                "width": width,
                "layers": v.get("layers", 12),
                "heads": width // v.get("head_width", 64),
                "mlp_ratio": v.get("mlp_ratio", 4.0),
                "output_dim": embed_dim,
                "pool_type": "mean" if v.get("pool_type") == "avg" else "cls",
                "act_layer": act,
                "ls_init_value": v.get("ls_init_value"),
            },
        )
    context = t.get("context_length", 77)
    text = ComponentConfig(
        "text_transformer",
        {
            "vocab_size": t.get("vocab_size", 49408),
            "context_length": context,
            "width": t.get("width", 512),
            "layers": t.get("layers", 12),
            "heads": t.get("heads", 8),
            "mlp_ratio": t.get("mlp_ratio", 4.0),
            "output_dim": embed_dim,
            "act_layer": act,
            "ls_init_value": t.get("ls_init_value"),
        },
    )
    pre = preprocess or {}
    return ModelConfig(
        name=name,
        towers={"image": image, "text": text},
        embed_dim=embed_dim,
        init_logit_bias=model_cfg.get("init_logit_bias"),
        tokenizer=TokenizerConfig("clip", context),
        preprocess=PreprocessConfig(image_size=size, mean=pre.get("mean"), std=pre.get("std")),
    )
