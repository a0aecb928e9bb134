"""Translating model configs between polymodal and open_clip / Hugging Face CLIP.

Imports read every foreign field against the tables of ``convert_fields`` (mapped, ignored with a
reason, or refused by name). Exports read each tower's arguments as configured, else from its
encoder's constructor, and refuse any argument the foreign format cannot express.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from polymodal.encoders.layers import to_pair

from .checkpoint import CheckpointError
from .config import ENCODER_TYPES, ComponentConfig, ModelConfig, PreprocessConfig, TokenizerConfig
from .convert_fields import (
    HF_MODEL_FIELDS,
    HF_TEXT_FIELDS,
    HF_VISION_FIELDS,
    OPEN_CLIP_MODEL_FIELDS,
    OPEN_CLIP_PREPROCESS_FIELDS,
    OPEN_CLIP_TEXT_FIELDS,
    OPEN_CLIP_VISION_FIELDS,
    resolve_fields,
)

__all__ = [
    "config_from_hf",
    "config_from_open_clip",
    "constructor_default",
    "hf_config_from",
    "open_clip_model_cfg",
    "read_hf_preprocess",
    "tower_arg",
]

# open_clip and HF CLIP build their norms as torch's LayerNorm with its default epsilon
_TORCH_LAYERNORM_EPS = nn.LayerNorm(1).eps
# arguments that act only in training (dropout): a format without them still gives the same outputs
_TRAINING_ONLY = {"drop", "attn_drop", "patch_dropout"}


def constructor_default(encoder_type: str, name: str) -> Any:
    """The default of argument ``name`` in the constructor of encoder ``encoder_type``."""
    parameter = inspect.signature(ENCODER_TYPES[encoder_type]).parameters[name]
    return parameter.default


def tower_arg(tower: ComponentConfig, name: str) -> Any:
    """A tower's argument as configured, else its encoder constructor's default."""
    return tower.args[name] if name in tower.args else constructor_default(tower.type, name)


def _set_if_differs(args: dict[str, Any], encoder_type: str, name: str, value: Any) -> None:
    if value != constructor_default(encoder_type, name):
        args[name] = value


def _refuse_unexpressed(tower: ComponentConfig, handled: set[str], fmt: str, modality: str) -> None:
    """Refuse arguments set away from their default that ``fmt`` has no field for."""
    lost = sorted(
        name
        for name, value in tower.args.items()
        if name not in handled | _TRAINING_ONLY and value != constructor_default(tower.type, name)
    )
    if lost:
        values = ", ".join(f"{n}={tower.args[n]!r}" for n in lost)
        raise CheckpointError(f"the {modality} tower sets {values}, which {fmt} configs cannot express")


# ------------------------------------------------------------------------------------------ open_clip


def _open_clip_act(quick_gelu: bool, act_kwargs: dict | None, where: str) -> str:
    if not act_kwargs:
        return "quick_gelu" if quick_gelu else "gelu"
    if not quick_gelu and act_kwargs in ({"approximate": "tanh"}, {"approximate": "none"}):
        return "gelu_tanh" if act_kwargs["approximate"] == "tanh" else "gelu"
    raise CheckpointError(
        f"{where}.act_kwargs={act_kwargs!r} (quick_gelu={quick_gelu}) is not supported; "
        "only {'approximate': 'tanh'} on GELU converts"
    )


def _open_clip_norm_eps(norm_kwargs: dict | None, where: str) -> float:
    if not norm_kwargs:
        return _TORCH_LAYERNORM_EPS
    if set(norm_kwargs) != {"eps"}:
        raise CheckpointError(f"{where}.norm_kwargs={norm_kwargs!r} is not supported; only {{'eps': ...}} converts")
    return float(norm_kwargs["eps"])


def _open_clip_image(v: dict[str, Any], embed_dim: int, quick_gelu: bool) -> ComponentConfig:
    if isinstance(v["layers"], (list, tuple)):  # ModifiedResNet reads only these fields
        args = {
            "layers": list(v["layers"]),
            "width": v["width"],
            "heads": v["width"] * 32 // v["head_width"],
            "image_size": v["image_size"],
            "output_dim": embed_dim,
        }
        return ComponentConfig("modified_resnet", args)
    pools = {"tok": "cls", "avg": "mean"}
    if v["pool_type"] not in pools:
        raise CheckpointError(f"vision_cfg.pool_type={v['pool_type']!r} is not supported; expected 'tok' or 'avg'")
    if v["final_ln_after_pool"] and v["pool_type"] != "tok":
        raise CheckpointError(
            "vision_cfg.final_ln_after_pool=True with pool_type 'avg' is not supported: polymodal normalises "
            "the tokens before averaging them"
        )
    args = {
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "width": v["width"],
        "layers": v["layers"],
        "heads": v["width"] // v["head_width"],
        "mlp_ratio": v["mlp_ratio"],
        "output_dim": embed_dim,
        "pool_type": pools[v["pool_type"]],
        "act_layer": _open_clip_act(quick_gelu, v["act_kwargs"], "vision_cfg"),
    }
    _set_if_differs(args, "vit", "norm_eps", _open_clip_norm_eps(v["norm_kwargs"], "vision_cfg"))
    _set_if_differs(args, "vit", "pre_norm", not v["no_ln_pre"])
    _set_if_differs(args, "vit", "ls_init_value", v["ls_init_value"])
    _set_if_differs(args, "vit", "patch_dropout", float(v["patch_dropout"]))
    return ComponentConfig("vit", args)


def _open_clip_text(t: dict[str, Any], embed_dim: int, quick_gelu: bool) -> ComponentConfig:
    if t["pool_type"] not in ("argmax", "eos", "first"):
        raise CheckpointError(
            f"text_cfg.pool_type={t['pool_type']!r} is not supported: open_clip's 'last' reads the final "
            "position whatever the padding; expected 'argmax', 'eos' or 'first'"
        )
    args = {
        "vocab_size": t["vocab_size"],
        "context_length": t["context_length"],
        "width": t["width"],
        "layers": t["layers"],
        "heads": t["heads"],
        "mlp_ratio": t["mlp_ratio"],
        "output_dim": embed_dim,
        "act_layer": _open_clip_act(quick_gelu, t["act_kwargs"], "text_cfg"),
    }
    _set_if_differs(args, "text_transformer", "pool_type", t["pool_type"])
    if t["pool_type"] == "eos":
        args["eos_token_id"] = t["eos_id"]
    _set_if_differs(args, "text_transformer", "pad_token_id", t["pad_id"])
    _set_if_differs(args, "text_transformer", "norm_eps", _open_clip_norm_eps(t["norm_kwargs"], "text_cfg"))
    _set_if_differs(args, "text_transformer", "ls_init_value", t["ls_init_value"])
    _set_if_differs(args, "text_transformer", "proj_bias", bool(t["proj_bias"]))
    return ComponentConfig("text_transformer", args)


def _open_clip_tokenizer(t: dict[str, Any], tokenizer_dir: str | None) -> TokenizerConfig:
    name = t["hf_tokenizer_name"]
    if name is None:
        if tokenizer_dir is not None:
            raise CheckpointError(
                f"tokenizer_dir={str(tokenizer_dir)!r} was given, but this open_clip model uses open_clip's "
                "own CLIP tokenizer (text_cfg has no hf_tokenizer_name)"
            )
        return TokenizerConfig("clip", t["context_length"])
    if tokenizer_dir is None:
        # HFTokenizer reads a hub id from the local Hugging Face cache only, and says so if it is absent
        return TokenizerConfig("hf", t["context_length"], name)
    if not Path(tokenizer_dir).is_dir():
        raise CheckpointError(
            f"tokenizer_dir {str(tokenizer_dir)!r} is not a directory; expected a local copy of the "
            f"{name!r} tokenizer (its tokenizer.json and tokenizer_config.json)"
        )
    return TokenizerConfig("hf", t["context_length"], str(Path(tokenizer_dir).resolve()))


def config_from_open_clip(
    model_cfg: dict[str, Any],
    name: str = "open-clip",
    preprocess: dict[str, Any] | None = None,
    tokenizer_dir: str | None = None,
) -> ModelConfig:
    """Build a polymodal config from an open_clip ``model_cfg`` (standard ViT or modified-ResNet CLIP).

    Every field is read against ``convert_fields``; one polymodal cannot reproduce raises a
    ``CheckpointError`` naming it. A text tower trained with a Hugging Face tokenizer
    (``text_cfg.hf_tokenizer_name``) gets an ``"hf"`` tokenizer: at ``tokenizer_dir`` when given,
    else that hub id, which is read from the local Hugging Face cache (nothing is downloaded).

    Args:
        model_cfg: the ``model_cfg`` (or a whole ``open_clip_config.json`` holding one).
        name: the config's name.
        preprocess: open_clip's ``preprocess_cfg``.
        tokenizer_dir: a local directory holding the Hugging Face tokenizer the text tower uses.
    """
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    top = resolve_fields(model_cfg, OPEN_CLIP_MODEL_FIELDS, "open_clip model_cfg")
    v = resolve_fields(top["vision_cfg"] or {}, OPEN_CLIP_VISION_FIELDS, "vision_cfg")
    t = resolve_fields(top["text_cfg"] or {}, OPEN_CLIP_TEXT_FIELDS, "text_cfg")
    pre = dict(preprocess or {})
    resolve_fields(pre, OPEN_CLIP_PREPROCESS_FIELDS, "preprocess_cfg")
    if "size" in pre and to_pair(pre["size"]) != to_pair(v["image_size"]):
        raise CheckpointError(
            f"preprocess_cfg.size {pre['size']!r} differs from vision_cfg.image_size {v['image_size']!r}; "
            "expected the transform to produce what the image tower takes"
        )
    embed_dim = top["embed_dim"]
    bias = top["init_logit_bias"]
    return ModelConfig(
        name=name,
        towers={
            "image": _open_clip_image(v, embed_dim, top["quick_gelu"]),
            "text": _open_clip_text(t, embed_dim, top["quick_gelu"]),
        },
        embed_dim=embed_dim,
        init_logit_scale=float(top["init_logit_scale"]),
        init_logit_bias=float(bias) if bias is not None else None,
        tokenizer=_open_clip_tokenizer(t, tokenizer_dir),
        preprocess=PreprocessConfig(
            **{k: list(pre[k]) for k in ("mean", "std") if pre.get(k) is not None},
            **{k: pre[k] for k in ("interpolation", "resize_mode") if k in pre},
        ),
    )


def _open_clip_act_fields(tower: ComponentConfig, modality: str) -> tuple[bool, dict[str, Any]]:
    """``(quick_gelu, extra vision/text_cfg fields)`` expressing the tower's activation and norm."""
    act = tower_arg(tower, "act_layer")
    if act not in ("gelu", "quick_gelu", "gelu_tanh"):
        raise CheckpointError(f"the {modality} tower's activation {act!r} has no open_clip equivalent")
    extra: dict[str, Any] = {"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {}
    if tower_arg(tower, "norm_eps") != _TORCH_LAYERNORM_EPS:
        extra["norm_kwargs"] = {"eps": tower_arg(tower, "norm_eps")}
    if tower_arg(tower, "ls_init_value") is not None:
        extra["ls_init_value"] = tower_arg(tower, "ls_init_value")
    return act == "quick_gelu", extra


def open_clip_model_cfg(config: ModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` (as in its ``model_configs/*.json``) of a polymodal CLIP config."""
    _require_clip_shape(config, image_types=("vit", "modified_resnet"))
    image, text = config.towers["image"], config.towers["text"]
    common = {"width", "layers", "heads", "image_size", "output_dim"}
    if image.type == "vit":
        _refuse_unexpressed(
            image,
            common | {"patch_size", "mlp_ratio", "pool_type", "act_layer", "norm_eps", "pre_norm", "ls_init_value"},
            "open_clip",
            "image",
        )
        quick_image, vision = _open_clip_act_fields(image, "image")
        width = tower_arg(image, "width")
        vision.update(
            image_size=tower_arg(image, "image_size"),
            layers=tower_arg(image, "layers"),
            width=width,
            head_width=width // tower_arg(image, "heads"),
            patch_size=tower_arg(image, "patch_size"),
            mlp_ratio=tower_arg(image, "mlp_ratio"),
        )
        if tower_arg(image, "pool_type") == "mean":
            vision["pool_type"] = "avg"
        if not tower_arg(image, "pre_norm"):
            vision["no_ln_pre"] = True
        if tower_arg(image, "patch_dropout"):
            vision["patch_dropout"] = tower_arg(image, "patch_dropout")
    else:
        _refuse_unexpressed(image, common, "open_clip", "image")  # open_clip's ResNet: ReLU, BatchNorm, RGB
        quick_image, width = None, tower_arg(image, "width")
        vision = {
            "image_size": tower_arg(image, "image_size"),
            "layers": list(tower_arg(image, "layers")),
            "width": width,
            "head_width": width * 32 // tower_arg(image, "heads"),
        }
    _refuse_unexpressed(
        text,
        common
        | {"vocab_size", "context_length", "mlp_ratio", "pool_type", "eos_token_id", "pad_token_id"}
        | {"act_layer", "norm_eps", "ls_init_value", "proj_bias"},
        "open_clip",
        "text",
    )
    quick_text, text_cfg = _open_clip_act_fields(text, "text")
    if quick_image is not None and quick_image != quick_text:
        raise CheckpointError("open_clip needs both towers to use QuickGELU, or neither")
    text_cfg.update({k: tower_arg(text, k) for k in ("context_length", "vocab_size", "width", "heads", "layers")})
    text_cfg["mlp_ratio"] = tower_arg(text, "mlp_ratio")
    pool = tower_arg(text, "pool_type")
    if pool not in ("argmax", "eos", "first"):
        raise CheckpointError(f"open_clip's CLIP text tower cannot pool with {pool!r}")
    if pool != OPEN_CLIP_TEXT_FIELDS["pool_type"].default:
        text_cfg["pool_type"] = pool
    if pool == "eos":
        text_cfg["eos_id"] = tower_arg(text, "eos_token_id")
    if tower_arg(text, "pad_token_id") != OPEN_CLIP_TEXT_FIELDS["pad_id"].default:
        text_cfg["pad_id"] = tower_arg(text, "pad_token_id")
    if tower_arg(text, "proj_bias"):
        text_cfg["proj_bias"] = True
    if config.tokenizer is not None and config.tokenizer.type == "hf":
        text_cfg["hf_tokenizer_name"] = config.tokenizer.path
    cfg: dict[str, Any] = {"embed_dim": config.embed_dim, "vision_cfg": vision, "text_cfg": text_cfg}
    if quick_text:
        cfg["quick_gelu"] = True
    if config.init_logit_scale != OPEN_CLIP_MODEL_FIELDS["init_logit_scale"].default:
        cfg["init_logit_scale"] = config.init_logit_scale
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


def _hf_tower(given: dict[str, Any] | None, extra: dict[str, Any] | None, table, where: str, kinds) -> dict[str, Any]:
    # a null value in an HF config means "the default", as transformers reads it
    merged = {k: v for k, v in {**(given or {}), **(extra or {})}.items() if v is not None}
    resolved = resolve_fields(merged, table, where)
    if "model_type" in merged and merged["model_type"] not in kinds:
        raise CheckpointError(f"{where}.model_type is {merged['model_type']!r}; expected one of {kinds}")
    if resolved["hidden_act"] not in _HF_ACTS:
        raise CheckpointError(
            f"{where}.hidden_act={resolved['hidden_act']!r} is not supported; expected one of {sorted(_HF_ACTS)}"
        )
    return resolved


def config_from_hf(hf: dict[str, Any], name: str = "hf-clip") -> ModelConfig:
    """Build a polymodal config from a Hugging Face ``CLIPConfig`` dict (its ``config.json``).

    Every field is read against ``convert_fields``; one polymodal cannot reproduce raises a
    ``CheckpointError`` naming it.
    """
    if hf.get("model_type") != "clip":
        raise CheckpointError(f"expected a Hugging Face CLIP config (model_type 'clip'), got {hf.get('model_type')!r}")
    top = resolve_fields({k: v for k, v in hf.items() if v is not None}, HF_MODEL_FIELDS, "Hugging Face CLIPConfig")
    t = _hf_tower(
        hf.get("text_config"), hf.get("text_config_dict"), HF_TEXT_FIELDS, "text_config", ("clip_text_model",)
    )
    v = _hf_tower(
        hf.get("vision_config"), hf.get("vision_config_dict"), HF_VISION_FIELDS, "vision_config", ("clip_vision_model",)
    )
    embed_dim = top["projection_dim"]
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
        "pad_token_id": t["pad_token_id"],
    }
    _set_if_differs(text_args, "text_transformer", "attn_drop", float(t["attention_dropout"]))
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
    _set_if_differs(vision_args, "vit", "attn_drop", float(v["attention_dropout"]))
    return ModelConfig(
        name=name,
        towers={
            "image": ComponentConfig("vit", vision_args),
            "text": ComponentConfig("text_transformer", text_args),
        },
        embed_dim=embed_dim,
        init_logit_scale=float(top["logit_scale_init_value"]),
        tokenizer=TokenizerConfig("clip", t["max_position_embeddings"]),
    )


def hf_config_from(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``CLIPConfig`` keyword arguments equivalent to a polymodal CLIP config."""
    _require_clip_shape(config, image_types=("vit",))
    image, text = config.towers["image"], config.towers["text"]
    inverse_acts = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
    dims = {"width", "layers", "heads", "mlp_ratio", "output_dim", "act_layer", "norm_eps"}
    _refuse_unexpressed(image, dims | {"image_size", "patch_size", "in_chans"}, "Hugging Face CLIP", "image")
    _refuse_unexpressed(
        text,
        dims | {"vocab_size", "context_length", "pool_type", "eos_token_id", "pad_token_id"},
        "Hugging Face CLIP",
        "text",
    )
    for modality, tower in (("image", image), ("text", text)):
        act = tower_arg(tower, "act_layer")
        if act not in inverse_acts:
            raise CheckpointError(f"the {modality} tower's activation {act!r} has no Hugging Face CLIP equivalent")
    if config.init_logit_bias is not None:
        raise CheckpointError("HF CLIPModel has no logit bias; this model was configured for the sigmoid loss")
    text_pool = tower_arg(text, "pool_type")
    if text_pool not in ("argmax", "eos"):
        raise CheckpointError(f"HF CLIP pools text at the end-of-text token, not with {text_pool!r}")
    patch, size = tower_arg(image, "patch_size"), tower_arg(image, "image_size")
    if not isinstance(patch, int) or not isinstance(size, int):
        raise CheckpointError("HF CLIP needs a square image_size and patch_size")

    def tower_config(tower: ComponentConfig) -> dict[str, Any]:
        width = tower_arg(tower, "width")
        return {
            "hidden_size": width,
            "intermediate_size": round(width * tower_arg(tower, "mlp_ratio")),
            "num_hidden_layers": tower_arg(tower, "layers"),
            "num_attention_heads": tower_arg(tower, "heads"),
            "hidden_act": inverse_acts[tower_arg(tower, "act_layer")],
            "layer_norm_eps": tower_arg(tower, "norm_eps"),
            "attention_dropout": tower_arg(tower, "attn_drop"),
            "projection_dim": config.embed_dim,
        }

    return {
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "text_config": {
            **tower_config(text),
            "vocab_size": tower_arg(text, "vocab_size"),
            "max_position_embeddings": tower_arg(text, "context_length"),
            "eos_token_id": 2 if text_pool == "argmax" else tower_arg(text, "eos_token_id"),
            "pad_token_id": tower_arg(text, "pad_token_id"),
        },
        "vision_config": {
            **tower_config(image),
            "num_channels": tower_arg(image, "in_chans"),
            "image_size": size,
            "patch_size": patch,
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
    text_out, image_out = (
        tower_arg(config.towers["text"], "output_dim"),
        tower_arg(config.towers["image"], "output_dim"),
    )
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
