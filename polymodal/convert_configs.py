"""Translating model configs between polymodal and open_clip / Hugging Face CLIP (SigLIP: ``convert_siglip``).

Imports read every foreign field against the tables of ``convert_fields`` (mapped, ignored with a
reason, or refused by name). Exports read each tower's arguments as configured, else from its
encoder's constructor, and refuse any argument the foreign format cannot express.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from polymodal.encoders.layers import to_pair

from .checkpoint import CheckpointError
from .config import (
    ENCODER_TYPES,
    TOKENIZER_CLEAN_DEFAULT,
    ComponentConfig,
    ModelConfig,
    PreprocessConfig,
    TokenizerConfig,
)
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
    "HF_ACTIVATIONS",
    "HF_ACTIVATION_NAMES",
    "HF_RESAMPLE",
    "config_from_hf_clip",
    "config_from_open_clip",
    "constructor_default",
    "has_hf_tokenizer",
    "hf_config_from",
    "hf_tower",
    "open_clip_model_cfg",
    "read_hf_preprocess",
    "refuse_unexpressed",
    "set_if_differs",
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


def set_if_differs(args: dict[str, Any], encoder_type: str, name: str, value: Any) -> None:
    """Set ``args[name] = value`` unless it is the ``encoder_type`` constructor's default (never restated)."""
    if value != constructor_default(encoder_type, name):
        args[name] = value


def refuse_unexpressed(tower: ComponentConfig, handled: set[str], fmt: str, modality: str) -> None:
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


def _open_clip_timm_image(v: dict[str, Any], embed_dim: int) -> ComponentConfig:
    """open_clip's ``TimmModel``: a timm trunk built without ``img_size`` (so at the architecture's own input
    size), pooled by timm, projected by open_clip's head, by timm's classifier head, or not at all."""
    name, pool, proj = v["timm_model_name"], v["timm_pool"], v["timm_proj"]
    try:
        import timm
    except ImportError:
        raise CheckpointError(
            f"vision_cfg.timm_model_name={name!r} is a timm image tower, and timm is not installed: pip install timm"
        ) from None
    if not timm.is_model(name):
        raise CheckpointError(
            f"vision_cfg.timm_model_name={name!r} is not an architecture of the installed timm {timm.__version__}; "
            "a newer timm may have it (pip install -U timm)"
        )
    if pool in ("abs_attn", "rot_attn"):
        raise CheckpointError(
            f"vision_cfg.timm_pool={pool!r} (open_clip's own attention pool over a timm trunk) is not supported; "
            "expected one of timm's pools ('avg', 'token', 'map', ...) or ''"
        )
    projections = {"linear": "linear", "mlp": "mlp", "none": None, None: "head", "": "head"}
    if proj not in projections:
        raise CheckpointError(f"vision_cfg.timm_proj={proj!r} is not supported; expected 'linear', 'mlp', 'none'")
    args: dict[str, Any] = {
        "model_name": name,
        "proj": projections[proj],
        "output_dim": None if proj == "none" else embed_dim,
        # open_clip resets timm's pool only when timm_pool is non-empty: '' keeps the architecture's own
        "pool_type": pool or None,
    }
    set_if_differs(args, "timm", "proj_bias", bool(v["timm_proj_bias"]) and proj in ("linear", "mlp"))
    set_if_differs(args, "timm", "drop_path", float(v["timm_drop_path"] or 0.0))
    return ComponentConfig("timm", args)


def _open_clip_image(v: dict[str, Any], embed_dim: int, quick_gelu: bool) -> ComponentConfig:
    if v["timm_model_name"]:
        return _open_clip_timm_image(v, embed_dim)
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
    set_if_differs(args, "vit", "norm_eps", _open_clip_norm_eps(v["norm_kwargs"], "vision_cfg"))
    set_if_differs(args, "vit", "pre_norm", not v["no_ln_pre"])
    set_if_differs(args, "vit", "ls_init_value", v["ls_init_value"])
    set_if_differs(args, "vit", "patch_dropout", float(v["patch_dropout"]))
    return ComponentConfig("vit", args)


# open_clip's text pools by polymodal's names; its "last" is the final position whatever the padding
_OPEN_CLIP_TEXT_POOLS = {"argmax": "argmax", "eos": "eos", "first": "first", "last": "final_position"}


# open_clip's poolers of Hugging Face text towers, by polymodal's HFTextEncoder pool names
_OPEN_CLIP_HF_POOLERS = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls"}


def _hf_model_config(name: str) -> dict[str, Any]:
    """The ``config.json`` of Hugging Face model ``name``: a local directory, or a repo in the local hub cache."""
    from .hub import ModelNotFoundError, cached_file

    path = Path(name) / "config.json" if Path(name).is_dir() else None
    if path is None:
        try:
            path = cached_file(name, "config.json")
        except ModelNotFoundError as err:
            raise CheckpointError(
                f"text_cfg.hf_model_name={name!r} is a Hugging Face text tower whose architecture polymodal reads "
                f"from its config.json, which is missing: {err}"
            ) from None
    return json.loads(path.read_text())


def _open_clip_hf_text(t: dict[str, Any], embed_dim: int) -> ComponentConfig:
    """open_clip's ``HFTextEncoder``: a transformers encoder, open_clip's pooler, and its projection."""
    from transformers import AutoConfig

    name, pooler, proj = t["hf_model_name"], t["hf_pooler_type"], t["hf_proj_type"]
    hf = _hf_model_config(name)
    try:
        architecture = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    except (KeyError, ValueError):
        import transformers

        raise CheckpointError(
            f"text_cfg.hf_model_name={name!r} has model_type {hf.get('model_type')!r}, which the installed "
            f"transformers {transformers.__version__} does not know"
        ) from None
    if getattr(architecture, "is_encoder_decoder", False):
        raise CheckpointError(
            f"text_cfg.hf_model_name={name!r} is an encoder-decoder ({hf['model_type']}); open_clip keeps only its "
            "encoder, which polymodal's HFTextEncoder does not split off"
        )
    if pooler is None:  # open_clip's default pooler of the architecture
        from open_clip.hf_configs import arch_dict

        pooler = arch_dict.get(hf["model_type"], {}).get("pooler")
    if pooler not in _OPEN_CLIP_HF_POOLERS:
        raise CheckpointError(
            f"text_cfg.hf_pooler_type={pooler!r} is not supported (cls_pooler reads the transformer's own pooler "
            f"layer, which polymodal drops); expected one of {sorted(_OPEN_CLIP_HF_POOLERS)}"
        )
    width = architecture.hidden_size
    if proj is None and width != embed_dim:
        raise CheckpointError(
            f"text_cfg.hf_proj_type=None keeps the width {width}, which differs from embed_dim {embed_dim}"
        )
    if proj not in ("linear", "mlp", None):
        raise CheckpointError(f"text_cfg.hf_proj_type={proj!r} is not supported; expected 'linear', 'mlp' or None")
    args = {"config": hf, "pool_type": _OPEN_CLIP_HF_POOLERS[pooler], "proj": proj, "output_dim": embed_dim}
    return ComponentConfig("hf_text", args)


def _open_clip_text(t: dict[str, Any], embed_dim: int, quick_gelu: bool) -> ComponentConfig:
    if t["hf_model_name"]:
        return _open_clip_hf_text(t, embed_dim)
    if t["pool_type"] not in _OPEN_CLIP_TEXT_POOLS:
        raise CheckpointError(
            f"text_cfg.pool_type={t['pool_type']!r} is not supported; expected one of {sorted(_OPEN_CLIP_TEXT_POOLS)}"
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
    set_if_differs(args, "text_transformer", "pool_type", _OPEN_CLIP_TEXT_POOLS[t["pool_type"]])
    if t["no_causal_mask"]:  # open_clip then passes no mask at all: every token attends to the padding too
        args.update(causal=False, mask_padding=False)
    if t["pool_type"] == "eos":
        args["eos_token_id"] = t["eos_id"]
    set_if_differs(args, "text_transformer", "pad_token_id", t["pad_id"])
    set_if_differs(args, "text_transformer", "norm_eps", _open_clip_norm_eps(t["norm_kwargs"], "text_cfg"))
    set_if_differs(args, "text_transformer", "ls_init_value", t["ls_init_value"])
    set_if_differs(args, "text_transformer", "proj_bias", bool(t["proj_bias"]))
    return ComponentConfig("text_transformer", args)


def _open_clip_tokenizer(t: dict[str, Any], tokenizer_dir: str | None) -> TokenizerConfig:
    name = t["hf_tokenizer_name"]
    options = dict(t["tokenizer_kwargs"] or {})
    clean = options.pop("clean", TOKENIZER_CLEAN_DEFAULT)
    if options:
        raise CheckpointError(
            f"text_cfg.tokenizer_kwargs {sorted(options)} are not supported; only 'clean' converts (polymodal's "
            "tokenizer would otherwise give other ids)"
        )
    if name is None and clean != TOKENIZER_CLEAN_DEFAULT:
        raise CheckpointError(
            f"text_cfg.tokenizer_kwargs.clean={clean!r} applies to Hugging Face tokenizers, and this model uses "
            "open_clip's own CLIP tokenizer"
        )
    if name is None:
        if tokenizer_dir is not None:
            raise CheckpointError(
                f"tokenizer_dir={str(tokenizer_dir)!r} was given, but this open_clip model uses open_clip's "
                "own CLIP tokenizer (text_cfg has no hf_tokenizer_name)"
            )
        return TokenizerConfig("clip", t["context_length"])
    if tokenizer_dir is None:
        # HFTokenizer reads a hub id from the local Hugging Face cache only, and says so if it is absent
        return TokenizerConfig("hf", t["context_length"], name, clean=clean)
    if not Path(tokenizer_dir).is_dir():
        raise CheckpointError(
            f"tokenizer_dir {str(tokenizer_dir)!r} is not a directory; expected a local copy of the "
            f"{name!r} tokenizer (its tokenizer.json and tokenizer_config.json)"
        )
    return TokenizerConfig("hf", t["context_length"], str(Path(tokenizer_dir).resolve()), clean=clean)


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
    from .convert_coca import config_from_open_clip_coca, uses_coca_parts  # it builds on this function

    if uses_coca_parts(model_cfg):  # CoCa (multimodal_cfg), or its attentional pooler / class token
        return config_from_open_clip_coca(model_cfg, name, preprocess, tokenizer_dir)
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
    # a timm tower takes no image_size argument (open_clip builds timm's architecture at its own size)
    size = {"image_size": v["image_size"]} if v["timm_model_name"] else {}
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
            **size,
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
        refuse_unexpressed(
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
        pool = tower_arg(image, "pool_type")
        if pool not in ("cls", "mean"):
            raise CheckpointError(f"open_clip's ViT pools with its class token or the mean, not {pool!r}")
        if pool == "mean":
            vision["pool_type"] = "avg"
        if not tower_arg(image, "pre_norm"):
            vision["no_ln_pre"] = True
        if tower_arg(image, "patch_dropout"):
            vision["patch_dropout"] = tower_arg(image, "patch_dropout")
    else:
        refuse_unexpressed(image, common, "open_clip", "image")  # open_clip's ResNet: ReLU, BatchNorm, RGB
        quick_image, width = None, tower_arg(image, "width")
        vision = {
            "image_size": tower_arg(image, "image_size"),
            "layers": list(tower_arg(image, "layers")),
            "width": width,
            "head_width": width * 32 // tower_arg(image, "heads"),
        }
    refuse_unexpressed(
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

HF_ACTIVATIONS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# the Hugging Face name written for each polymodal activation on export
HF_ACTIVATION_NAMES = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_tower(given: dict[str, Any] | None, extra: dict[str, Any] | None, table, where: str, kinds) -> dict[str, Any]:
    """A Hugging Face tower config (``given``, with a legacy ``extra`` dict over it) read against ``table``:
    its fields over the defaults, after checking its ``model_type`` is one of ``kinds`` and its activation."""
    # a null value in an HF config means "the default", as transformers reads it
    merged = {k: v for k, v in {**(given or {}), **(extra or {})}.items() if v is not None}
    resolved = resolve_fields(merged, table, where)
    if "model_type" in merged and merged["model_type"] not in kinds:
        raise CheckpointError(f"{where}.model_type is {merged['model_type']!r}; expected one of {kinds}")
    if resolved["hidden_act"] not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}.hidden_act={resolved['hidden_act']!r} is not supported; expected one of {sorted(HF_ACTIVATIONS)}"
        )
    return resolved


def hf_transformer_args(c: dict[str, Any], output_dim: int | None) -> dict[str, Any]:
    """The encoder arguments every Hugging Face CLIP-family tower config (CLIP, SigLIP) states the same way."""
    return {
        "width": c["hidden_size"],
        "layers": c["num_hidden_layers"],
        "heads": c["num_attention_heads"],
        "mlp_ratio": c["intermediate_size"] / c["hidden_size"],
        "output_dim": output_dim,
        "act_layer": HF_ACTIVATIONS[c["hidden_act"]],
        "norm_eps": c["layer_norm_eps"],
    }


def hf_text_args(t: dict[str, Any], output_dim: int | None) -> dict[str, Any]:
    """A Hugging Face text tower config as ``text_transformer`` arguments (pooling aside)."""
    return {
        "vocab_size": t["vocab_size"],
        "context_length": t["max_position_embeddings"],
        **hf_transformer_args(t, output_dim),
    }


def hf_vision_args(v: dict[str, Any], output_dim: int | None) -> dict[str, Any]:
    """A Hugging Face vision tower config as ``vit`` arguments (image and patch size aside)."""
    return {"in_chans": v["num_channels"], **hf_transformer_args(v, output_dim)}


def config_from_hf_clip(hf: dict[str, Any], name: str = "hf-clip") -> ModelConfig:
    """Build a polymodal config from a Hugging Face ``CLIPConfig`` dict (its ``config.json``).

    Every field is read against ``convert_fields``; one polymodal cannot reproduce raises a
    ``CheckpointError`` naming it.
    """
    if hf.get("model_type") != "clip":
        raise CheckpointError(f"expected a Hugging Face CLIP config (model_type 'clip'), got {hf.get('model_type')!r}")
    top = resolve_fields({k: v for k, v in hf.items() if v is not None}, HF_MODEL_FIELDS, "Hugging Face CLIPConfig")
    t = hf_tower(hf.get("text_config"), hf.get("text_config_dict"), HF_TEXT_FIELDS, "text_config", ("clip_text_model",))
    v = hf_tower(
        hf.get("vision_config"), hf.get("vision_config_dict"), HF_VISION_FIELDS, "vision_config", ("clip_vision_model",)
    )
    embed_dim = top["projection_dim"]
    eos = t["eos_token_id"]
    text_args = {
        **hf_text_args(t, embed_dim),
        # HF pools at the highest id for configs written before eos_token_id was fixed (eos == 2)
        "pool_type": "argmax" if eos == 2 else "eos",
        "eos_token_id": None if eos == 2 else eos,
        "pad_token_id": t["pad_token_id"],
    }
    set_if_differs(text_args, "text_transformer", "attn_drop", float(t["attention_dropout"]))
    vision_args = {"image_size": v["image_size"], "patch_size": v["patch_size"], **hf_vision_args(v, embed_dim)}
    set_if_differs(vision_args, "vit", "attn_drop", float(v["attention_dropout"]))
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
    inverse_acts = HF_ACTIVATION_NAMES
    dims = {"width", "layers", "heads", "mlp_ratio", "output_dim", "act_layer", "norm_eps"}
    refuse_unexpressed(image, dims | {"image_size", "patch_size", "in_chans"}, "Hugging Face CLIP", "image")
    refuse_unexpressed(
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


# PIL's resampling codes, as Hugging Face image processors store them
HF_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# files a Hugging Face tokenizer is read from: the fast tokenizer, byte-level BPE, SentencePiece (SigLIP, Gemma)
_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")


def has_hf_tokenizer(directory: Path) -> bool:
    """Whether a Hugging Face model directory holds its tokenizer's files."""
    return any((directory / name).is_file() for name in _HF_TOKENIZER_FILES)


def read_hf_preprocess(directory: Path, base: PreprocessConfig | None = None) -> PreprocessConfig | None:
    """``base`` (default: polymodal's defaults) updated with what a Hugging Face ``preprocessor_config.json``
    says: size, mean, std, the resampling filter, and a centre crop (``"shortest"``) or a resize to the whole
    size (``"squash"``); ``None`` when the directory has none."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data = data.get("image_processor", data)
    out = copy.deepcopy(base) if base is not None else PreprocessConfig()
    crop = data.get("crop_size") if data.get("do_center_crop", "crop_size" in data) else None
    size = crop or data.get("size")
    if crop is not None:
        out.resize_mode = "shortest"
    elif isinstance(size, dict) and "height" in size:
        out.resize_mode = "squash"
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if size is not None:
        out.image_size = size
    for name, key in (("mean", "image_mean"), ("std", "image_std")):
        if data.get(key) is not None:
            setattr(out, name, list(data[key]))
    resample = {code: name for name, code in HF_RESAMPLE.items()}.get(data.get("resample"))
    if resample is not None:
        out.interpolation = resample
    return out
