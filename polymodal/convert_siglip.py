"""Translating model configs between polymodal and Hugging Face SigLIP / Siglip2.

SigLIP's towers are polymodal's own encoders with a few arguments set (``SIGLIP_VISION_ARGS``,
``SIGLIP_TEXT_ARGS``): a ViT without class token or pre-norm, with a biased patch embedding and the
attention-pooling head, whose output is the image embedding (no projection); and a bidirectional text
transformer that attends to its padding, pools the final position and projects with a biased Linear.
Siglip2 (NaFlex) is imported at its position table's own grid, where it is that same ViT. Imports read
every field against the tables of ``convert_fields``; the weights are renamed by ``convert``.
"""

from __future__ import annotations

import math
from typing import Any

from polymodal.encoders.attention import mlp_hidden_dim

from .checkpoint import CheckpointError
from .config import ComponentConfig, ModelConfig, PreprocessConfig
from .convert_configs import (
    HF_ACTIVATION_NAMES,
    hf_text_args,
    hf_tower,
    hf_vision_args,
    refuse_unexpressed,
    set_if_differs,
    tower_arg,
)
from .convert_fields import (
    SIGLIP2_VISION_FIELDS,
    SIGLIP_MODEL_FIELDS,
    SIGLIP_TEXT_FIELDS,
    SIGLIP_VISION_FIELDS,
    resolve_fields,
)

__all__ = [
    "SIGLIP_MODEL_TYPES",
    "SIGLIP_TEXT_ARGS",
    "SIGLIP_VISION_ARGS",
    "config_from_hf_siglip",
    "is_siglip_shaped",
    "siglip_config_from",
    "siglip_preprocess",
]

SIGLIP_MODEL_TYPES = ("siglip", "siglip2")

# What makes polymodal's ViT and text transformer SigLIP's towers (read on import and checked on export).
SIGLIP_VISION_ARGS: dict[str, Any] = {
    "pool_type": "map",
    "class_token": False,
    "pre_norm": False,
    "patch_bias": True,
    "output_dim": None,  # the head's output is the embedding
}
SIGLIP_TEXT_ARGS: dict[str, Any] = {
    "causal": False,
    "mask_padding": False,
    "pool_type": "final_position",
    "proj_bias": True,
}

# The SigLIP paper's initial log temperature and bias (t' = log 10, b = -10). SiglipConfig has no field for
# them: an imported model's weights replace them, so they matter only to a run that re-initialises them.
_INIT_LOGIT_SCALE = math.log(10)
_INIT_LOGIT_BIAS = -10.0
# HF SigLIP multiplies by exp(logit_scale) unclamped, and trained values exceed polymodal's default clamp
# (ln 100), so an imported model is not clamped either: exp(88) is near float32's largest value, so no usable
# weight is clamped, and unlike infinity the bound is valid JSON in config.json.
_NO_CLAMP = 88.0

# The defaults of SiglipImageProcessor / Siglip2ImageProcessor (a square resize with no crop), for a
# directory without a preprocessor_config.json; tests check them against the installed transformers.
_PREPROCESS = {
    "siglip": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"},
    "siglip2": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"},
}


def siglip_preprocess(model_type: str) -> PreprocessConfig:
    """The image preprocessing transformers applies to a ``model_type`` model by default."""
    return PreprocessConfig(**_PREPROCESS[model_type])


def _square(value: Any, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise CheckpointError(f"{where}={value!r} is not supported; expected an int (SigLIP's patch grid is square)")


def _native_image_size(v: dict[str, Any], patch: int) -> int:
    side = math.isqrt(v["num_patches"])
    if side * side != v["num_patches"]:
        raise CheckpointError(
            f"vision_config.num_patches={v['num_patches']} is not supported: polymodal imports Siglip2 at its "
            "position table's square grid, so expected a square number (e.g. 256)"
        )
    return side * patch


def config_from_hf_siglip(hf: dict[str, Any], name: str = "hf-siglip") -> ModelConfig:
    """Build a polymodal config from a Hugging Face ``SiglipConfig`` or ``Siglip2Config`` dict (its ``config.json``).

    A Siglip2 model becomes the ViT of its native grid (``sqrt(num_patches)`` patches a side): it gives
    Siglip2's outputs for images that its processor turns into that grid (square images at
    ``max_num_patches == num_patches``). Every field is read against ``convert_fields``; one polymodal
    cannot reproduce raises a ``CheckpointError`` naming it.
    """
    kind = hf.get("model_type")
    if kind not in SIGLIP_MODEL_TYPES:
        raise CheckpointError(f"expected a Hugging Face SigLIP config (model_type 'siglip' or 'siglip2'), got {kind!r}")
    where = "Hugging Face SiglipConfig" if kind == "siglip" else "Hugging Face Siglip2Config"
    resolve_fields({k: v for k, v in hf.items() if v is not None}, SIGLIP_MODEL_FIELDS, where)
    t = hf_tower(hf.get("text_config"), None, SIGLIP_TEXT_FIELDS, "text_config", (f"{kind}_text_model",))
    vision_table = SIGLIP_VISION_FIELDS if kind == "siglip" else SIGLIP2_VISION_FIELDS
    v = hf_tower(hf.get("vision_config"), None, vision_table, "vision_config", (f"{kind}_vision_model",))
    width = v["hidden_size"]
    text_out = t["projection_size"] if t["projection_size"] is not None else t["hidden_size"]
    if text_out != width:
        raise CheckpointError(
            f"text_config.projection_size {text_out} differs from vision_config.hidden_size {width}; SigLIP "
            "compares the two towers' embeddings directly, so expected them equal"
        )
    patch = _square(v["patch_size"], "vision_config.patch_size")
    size = _square(v["image_size"], "vision_config.image_size") if kind == "siglip" else _native_image_size(v, patch)
    # no projection: the embedding is the pooled width (output_dim None)
    vision_args = {"image_size": size, "patch_size": patch, **hf_vision_args(v, None)}
    text_args = {**hf_text_args(t, text_out), "pad_token_id": t["pad_token_id"]}
    for args, encoder, fixed, cfg in (
        (vision_args, "vit", SIGLIP_VISION_ARGS, v),
        (text_args, "text_transformer", SIGLIP_TEXT_ARGS, t),
    ):
        for key, value in fixed.items():
            set_if_differs(args, encoder, key, value)
        set_if_differs(args, encoder, "attn_drop", float(cfg["attention_dropout"]))
    return ModelConfig(
        name=name,
        towers={
            "image": ComponentConfig("vit", vision_args),
            "text": ComponentConfig("text_transformer", text_args),
        },
        embed_dim=width,
        init_logit_scale=_INIT_LOGIT_SCALE,
        max_logit_scale=_NO_CLAMP,
        init_logit_bias=_INIT_LOGIT_BIAS,
        # no tokenizer of its own: the resolver adds the directory's ("hf") when it holds one
        tokenizer=None,
        preprocess=siglip_preprocess(kind),
    )


def is_siglip_shaped(config: ModelConfig) -> bool:
    """Whether a contrastive image-text config has SigLIP's image head (so exports as ``SiglipModel``)."""
    image = config.towers.get("image")
    return image is not None and image.type == "vit" and tower_arg(image, "pool_type") == "map"


def _require(tower: ComponentConfig, fixed: dict[str, Any], modality: str) -> None:
    for key, value in fixed.items():
        actual = tower_arg(tower, key)
        if key == "output_dim" and actual in (None, tower_arg(tower, "width")):
            continue
        if actual != value:
            raise CheckpointError(
                f"the {modality} tower has {key}={actual!r}, but Hugging Face SigLIP's has {key}={value!r}"
            )


def siglip_config_from(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``SiglipConfig`` keyword arguments equivalent to a SigLIP-shaped polymodal config.

    Raises:
        CheckpointError: naming the first argument or field SigLIP cannot express.
    """
    if config.kind != "contrastive" or set(config.towers) != {"image", "text"}:
        raise CheckpointError(
            f"only image-text contrastive models can be exported to Hugging Face SigLIP; "
            f"{config.name!r} has towers {sorted(config.towers)}"
        )
    image, text = config.towers["image"], config.towers["text"]
    if image.type != "vit" or text.type != "text_transformer":
        raise CheckpointError(
            "Hugging Face SigLIP needs a vit image tower and a text_transformer text tower, "
            f"got {image.type} and {text.type}"
        )
    _require(image, SIGLIP_VISION_ARGS, "image")
    _require(text, SIGLIP_TEXT_ARGS, "text")
    dims = {"width", "layers", "heads", "mlp_ratio", "output_dim", "act_layer", "norm_eps"}
    fmt = "Hugging Face SigLIP"
    refuse_unexpressed(image, dims | {"image_size", "patch_size", "in_chans"} | set(SIGLIP_VISION_ARGS), fmt, "image")
    refuse_unexpressed(
        text,
        dims | {"vocab_size", "context_length", "pad_token_id", "eos_token_id"} | set(SIGLIP_TEXT_ARGS),
        fmt,
        "text",
    )
    width = tower_arg(image, "width")
    text_out = tower_arg(text, "output_dim")
    if config.embed_dim != width or text_out != width:
        raise CheckpointError(
            f"Hugging Face SigLIP compares the image head's output (width {width}) with the text head's directly: "
            f"expected embed_dim and the text tower's output_dim {width}, got {config.embed_dim} and {text_out}"
        )
    if config.init_logit_bias is None:
        raise CheckpointError("HF SiglipModel has a logit bias; this model has none (init_logit_bias is None)")
    for modality, tower in (("image", image), ("text", text)):
        act = tower_arg(tower, "act_layer")
        if act not in HF_ACTIVATION_NAMES:
            raise CheckpointError(f"the {modality} tower's activation {act!r} has no Hugging Face SigLIP equivalent")
    patch, size = tower_arg(image, "patch_size"), tower_arg(image, "image_size")
    if not isinstance(patch, int) or not isinstance(size, int):
        raise CheckpointError(f"Hugging Face SigLIP needs a square image_size and patch_size, got {size} and {patch}")

    def tower_config(tower: ComponentConfig) -> dict[str, Any]:
        tower_width = tower_arg(tower, "width")
        return {
            "hidden_size": tower_width,
            "intermediate_size": mlp_hidden_dim(tower_width, tower_arg(tower, "mlp_ratio")),
            "num_hidden_layers": tower_arg(tower, "layers"),
            "num_attention_heads": tower_arg(tower, "heads"),
            "hidden_act": HF_ACTIVATION_NAMES[tower_arg(tower, "act_layer")],
            "layer_norm_eps": tower_arg(tower, "norm_eps"),
            "attention_dropout": tower_arg(tower, "attn_drop"),
        }

    text_config = {
        **tower_config(text),
        "vocab_size": tower_arg(text, "vocab_size"),
        "max_position_embeddings": tower_arg(text, "context_length"),
        "pad_token_id": tower_arg(text, "pad_token_id"),
        "projection_size": text_out,
    }
    if tower_arg(text, "eos_token_id") is not None:
        text_config["eos_token_id"] = tower_arg(text, "eos_token_id")
    vision_config = {**tower_config(image), "num_channels": tower_arg(image, "in_chans"), "image_size": size}
    vision_config["patch_size"] = patch
    return {"text_config": text_config, "vision_config": vision_config}
