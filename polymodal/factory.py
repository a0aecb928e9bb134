"""Building models, tokenizers and transforms by name, and loading pretrained weights of any supported format."""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal.encoders import AudioPreprocess, CLIPTokenizer, HFTokenizer, image_transform

from .checkpoint import (
    CONFIG_NAME,
    FORMAT_NAME,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    WEIGHTS_NAME,
    CheckpointError,
    load_state_dict_strict,
    read_state_dict,
)
from .config import ENCODER_TYPES, ModelConfig, TokenizerConfig
from .convert import (
    config_from_hf,
    config_from_open_clip,
    hf_to_polymodal,
    looks_like_hf_clip,
    looks_like_open_clip,
    open_clip_to_polymodal,
    read_hf_preprocess,
)
from .model import build_model
from .registry import get_model_config

_FOREIGN_WEIGHTS = (
    "pytorch_model.bin",
    OPEN_CLIP_WEIGHTS,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def apply_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Return a copy of ``config`` with overrides applied.

    ``overrides`` may set top-level config fields (``embed_dim=256``), merge constructor arguments into
    one tower (``image={"image_size": 96}``), or set ``act_layer`` / ``quick_gelu=True`` on every tower
    whose encoder takes an activation.
    """
    config = copy.deepcopy(config)
    fields = set(config.to_dict())
    for key, value in overrides.items():
        if key in config.towers:
            if not isinstance(value, dict):
                raise ValueError(f"override {key}= must be a dict of {key} encoder arguments, got {value!r}")
            config.towers[key].args.update(value)
            if "image_size" in value and key == "image" and "preprocess" not in overrides:
                config.preprocess.image_size = value["image_size"]  # the transform must produce what the tower takes
        elif key in ("act_layer", "quick_gelu"):
            act = value if key == "act_layer" else ("quick_gelu" if value else "gelu")
            for tower in config.towers.values():
                if "act_layer" in inspect.signature(ENCODER_TYPES[tower.type]).parameters:
                    tower.args["act_layer"] = act
        elif key in fields and key != "towers":
            setattr(config, key, value)
        else:
            raise ValueError(
                f"unknown override {key!r}; expected a config field {sorted(fields - {'towers'})}, "
                f"a tower name {sorted(config.towers)}, 'act_layer' or 'quick_gelu'"
            )
    return ModelConfig.from_dict(config.to_dict())


def create_model(
    name: str | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model (or one from a config), optionally loading weights.

    Args:
        name: a registered name (see ``list_models()``), a ``ModelConfig``, or a saved model directory.
        pretrained: weights to load: a polymodal directory, a Hugging Face CLIP directory, or a state-dict
            file (polymodal, open_clip or Hugging Face keys; ``.safetensors``, ``.pt``, ``.bin``).
        device: where to build the model.
        dtype: parameter dtype.
        **overrides: see ``apply_overrides``.
    """
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        if pretrained is not None:
            raise ValueError("pass either a saved model directory or pretrained=, not both")
        return from_pretrained(name, device=device, dtype=dtype)
    config = name if isinstance(name, ModelConfig) else get_model_config(str(name))
    config = apply_overrides(config, overrides)
    model = build_model(config, device=device)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model.to(dtype=dtype) if dtype is not None else model


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights of any supported format into an existing model, strictly."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in (WEIGHTS_NAME, *_FOREIGN_WEIGHTS) if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"directory {str(path)!r} has no weights file (looked for {WEIGHTS_NAME}, "
                f"{', '.join(_FOREIGN_WEIGHTS)})"
            )
        path = weights
    state = read_state_dict(path)
    if looks_like_hf_clip(state):
        state = hf_to_polymodal(state)
    elif looks_like_open_clip(state):
        if model.config is None or "image" not in model.config.towers:
            raise CheckpointError(f"{str(path)!r} is an open_clip CLIP checkpoint, which needs an image-text model")
        state = open_clip_to_polymodal(state, model.config)
    load_state_dict_strict(model, state, source=repr(str(path)))


def _newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a training run directory."""
    from polymodal.train.checkpoints import complete_checkpoints

    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"{str(run_dir)!r} is a training run without a complete checkpoint yet (checkpoints/ holds none "
            "with its completion marker); wait for the run to save one"
        )
    return found[-1]


def from_pretrained(path: str | os.PathLike, device=None, dtype=None) -> nn.Module:
    """Load a saved model directory: polymodal (``save_pretrained``), Hugging Face CLIP or open_clip
    (``open_clip_config.json`` with its weights), or a training run directory (``polymodal train``'s
    ``run_dir``: its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is a file; a single weights file does not say which architecture "
            "it holds: use create_model(NAME, pretrained=PATH)"
        )
    config_path = path / CONFIG_NAME
    if not config_path.is_file() and (path / "checkpoints").is_dir():
        return from_pretrained(_newest_checkpoint(path), device=device, dtype=dtype)
    if (path / OPEN_CLIP_CONFIG).is_file() and not config_path.is_file():
        data = json.loads((path / OPEN_CLIP_CONFIG).read_text())
        config = config_from_open_clip(data, name=path.name, preprocess=data.get("preprocess_cfg"))
        model = build_model(config, device=device)
        load_pretrained(model, path)
        return model.to(dtype=dtype) if dtype is not None else model
    if not config_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no {CONFIG_NAME}; expected a directory written by "
            "save_pretrained() or a Hugging Face CLIP model directory"
        )
    data = json.loads(config_path.read_text())
    if data.get("format") == FORMAT_NAME:
        config = ModelConfig.from_dict(data)
    elif data.get("model_type") == "clip":
        config = config_from_hf(data, name=path.name)
        preprocess = read_hf_preprocess(path)
        if preprocess is not None:
            config.preprocess = preprocess
        if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
            config.tokenizer = TokenizerConfig("hf", config.tokenizer.context_length, str(path.resolve()))
    else:
        raise CheckpointError(
            f"{str(config_path)!r} is neither a polymodal config (format '{FORMAT_NAME}') nor a "
            f"Hugging Face CLIP config (model_type 'clip'); got model_type {data.get('model_type')!r}"
        )
    model = build_model(config, device=device)
    load_pretrained(model, path)
    return model.to(dtype=dtype) if dtype is not None else model


def _config_of(model_or_name: nn.Module | ModelConfig | str) -> ModelConfig:
    if isinstance(model_or_name, ModelConfig):
        return model_or_name
    if isinstance(model_or_name, nn.Module):
        if getattr(model_or_name, "config", None) is None:
            raise ValueError(f"this {type(model_or_name).__name__} carries no ModelConfig")
        return model_or_name.config
    if Path(model_or_name).is_dir():
        return ModelConfig.from_dict(json.loads((Path(model_or_name) / CONFIG_NAME).read_text()))
    return get_model_config(model_or_name)


def get_tokenizer(model_or_name: nn.Module | ModelConfig | str, context_length: int | None = None):
    """The tokenizer a model was built for."""
    config = _config_of(model_or_name)
    tok = config.tokenizer
    if tok is None:
        raise ValueError(f"model {config.name!r} has no text tower, so no tokenizer")
    length = context_length or tok.context_length
    if tok.type == "clip":
        return CLIPTokenizer(context_length=length)
    if tok.type == "hf":
        return HFTokenizer(tok.path, context_length=length)
    raise ValueError(f"unknown tokenizer type {tok.type!r}; expected 'clip' or 'hf'")


def get_preprocess(model_or_name: nn.Module | ModelConfig | str, modality: str, is_train: bool = False):
    """The input transform of one modality: an image transform (PIL → tensor) or audio preprocessing."""
    config = _config_of(model_or_name)
    pre = config.preprocess
    if modality not in config.towers:
        raise ValueError(f"model {config.name!r} has no {modality!r} tower; it has {sorted(config.towers)}")
    if modality == "image":
        size = pre.image_size or config.towers["image"].args.get("image_size", 224)
        kwargs = {k: v for k, v in (("mean", pre.mean), ("std", pre.std)) if v is not None}
        return image_transform(
            size, is_train=is_train, interpolation=pre.interpolation, resize_mode=pre.resize_mode, **kwargs
        )
    if modality == "audio":
        rate = pre.sample_rate or config.towers["audio"].args.get("sample_rate", 16000)
        return AudioPreprocess(sample_rate=rate, clip_seconds=pre.clip_seconds or 1.0, random_crop=is_train)
    raise ValueError(f"{modality!r} inputs are tokenized, not transformed: use get_tokenizer()")


def create_model_and_transforms(
    name: str | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    **overrides: Any,
):
    """``(model, preprocess_train, preprocess_eval)`` for the model's image tower (its audio tower if it has none)."""
    model = create_model(name, pretrained=pretrained, device=device, dtype=dtype, **overrides)
    modality = "image" if "image" in model.config.towers else "audio"
    if modality not in model.config.towers:
        raise ValueError(f"model {model.config.name!r} has neither an image nor an audio tower")
    return (
        model,
        get_preprocess(model, modality, is_train=True),
        get_preprocess(model, modality, is_train=False),
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
