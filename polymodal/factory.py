"""The public constructors: models by reference, and the tokenizer and transforms a model was built for.

What a reference means is decided in ``polymodal.resolver``; the input facts come from
``ModelConfig.input_spec``. This module only puts them together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from polymodal.encoders import AudioPreprocess, CLIPTokenizer, HFTokenizer, image_transform
from polymodal.errors import ConfigError, InputError

from .config import ModelConfig
from .hub import ModelNotFoundError, hub_repo_of
from .resolver import apply_overrides, load_pretrained, parse_reference, resolve_model

__all__ = [
    "apply_overrides",
    "create_model",
    "create_model_and_transforms",
    "from_pretrained",
    "get_preprocess",
    "get_tokenizer",
    "load_pretrained",
]


def create_model(
    name: str | os.PathLike | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    **overrides: Any,
) -> nn.Module:
    """Build a model from any reference (``polymodal.resolver``), optionally loading weights.

    Args:
        name: a registered name (see ``list_models()``; it always means the registry, even where a
            folder of that name exists: write ``./NAME`` for the folder), a ``ModelConfig``, or a path
            to a saved model, a training run, a Hugging Face CLIP or an open_clip directory.
        pretrained: weights for a name or a config: a polymodal directory, a Hugging Face CLIP directory,
            or a state-dict file (polymodal, open_clip or Hugging Face keys; ``.safetensors``, ``.pt``, ``.bin``).
        device: where to build the model.
        dtype: parameter dtype.
        **overrides: see ``apply_overrides``.
    """
    return resolve_model(name, pretrained=pretrained, device=device, dtype=dtype, **overrides)


def from_pretrained(path: str | os.PathLike, device=None, dtype=None) -> nn.Module:
    """Load a saved model directory: polymodal (``save_pretrained``), Hugging Face CLIP or open_clip
    (``open_clip_config.json`` with its weights), or a training run directory (``polymodal train``'s
    ``run_dir``: its newest complete checkpoint); or a Hugging Face repo id (``"ORG/NAME"``,
    ``"hf-hub:ORG/NAME"``) from the local Hugging Face cache (``polymodal.hub``). ``path`` is never a
    registered name."""
    if hub_repo_of(path) is not None:
        return resolve_model(path, device=device, dtype=dtype)
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{str(path)!r} does not exist; expected a saved model directory or a hub repo id")
    return resolve_model(path, device=device, dtype=dtype)


def _config_of(model_or_ref: nn.Module | ModelConfig | str | os.PathLike) -> ModelConfig:
    config = getattr(model_or_ref, "config", None)  # a model, eager or exported (DeployedModel)
    if isinstance(config, ModelConfig):
        return config
    if isinstance(model_or_ref, nn.Module):
        raise InputError(f"this {type(model_or_ref).__name__} carries no ModelConfig")
    return parse_reference(model_or_ref).config  # a ModelConfig, a registered name or a directory


def get_tokenizer(model_or_name: nn.Module | ModelConfig | str | os.PathLike, context_length: int | None = None):
    """The tokenizer a model was built for."""
    config = _config_of(model_or_name)
    tok = config.tokenizer
    if tok is None:
        if "text" in config.towers:
            raise InputError(
                f"model {config.name!r} has a text tower but no tokenizer config (e.g. a Hugging Face SigLIP "
                "directory without tokenizer files); add its tokenizer's files to the directory, or set "
                "config.tokenizer = TokenizerConfig('hf', path=DIR)"
            )
        raise InputError(f"model {config.name!r} has no text tower, so no tokenizer")
    if context_length is None:
        context_length = config.input_spec("text").context_length if "text" in config.towers else tok.context_length
    length = {} if context_length is None else {"context_length": context_length}
    if tok.type == "clip":
        return CLIPTokenizer(**length)
    if tok.type == "hf":
        return HFTokenizer(tok.path, clean=tok.clean, **length)
    raise ConfigError(f"unknown tokenizer type {tok.type!r}; expected 'clip' or 'hf'")


def get_preprocess(model_or_name: nn.Module | ModelConfig | str | os.PathLike, modality: str, is_train: bool = False):
    """The input transform of one modality: an image transform (PIL → tensor) or audio preprocessing."""
    config = _config_of(model_or_name)
    if modality == "text":
        raise InputError("text inputs are tokenized, not transformed: use get_tokenizer()")
    spec = config.input_spec(modality)
    if modality == "image":
        if spec.image_size is None:
            raise ConfigError(
                f"model {config.name!r} does not say its image size: set preprocess.image_size "
                "(or the image tower's image_size)"
            )
        return image_transform(
            spec.image_size,
            is_train=is_train,
            mean=spec.mean,
            std=spec.std,
            interpolation=spec.interpolation,
            resize_mode=spec.resize_mode,
        )
    if modality == "audio":
        return AudioPreprocess(sample_rate=spec.sample_rate, clip_seconds=spec.clip_seconds, random_crop=is_train)
    raise InputError(f"no transform for {modality!r} inputs; expected 'image' or 'audio'")


def create_model_and_transforms(
    name: str | os.PathLike | ModelConfig,
    pretrained: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    **overrides: Any,
):
    """``(model, preprocess_train, preprocess_eval)`` for the model's query tower (``ModelConfig.query_modality``)."""
    model = create_model(name, pretrained=pretrained, device=device, dtype=dtype, **overrides)
    modality = model.config.query_modality
    return (
        model,
        get_preprocess(model, modality, is_train=True),
        get_preprocess(model, modality, is_train=False),
    )
