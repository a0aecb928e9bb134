"""LoRA adapters on a model's towers, through ``peft``: add, save the adapters alone, load them onto their
base, and merge them in.

A model config's ``lora`` (``polymodal.config.LoraConfig``) says which towers carry adapters, so a model
with adapters saves and loads like any other (``from_pretrained`` rebuilds the adapters before loading).
The adapter math and the merge are peft's (``inject_adapter_in_model``, ``LoraLayer.merge``); this module
picks the layers, freezes the base, and keeps the files honest about which base they belong to.

An adapter-only save (``save_adapter``) is ``adapter.safetensors`` plus ``adapter_config.json``: the LoRA
config, the base model's config and a fingerprint of the base weights, and where the base came from.
``load_adapter`` refuses a base whose architecture or weights differ.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import read_state_dict, save_state_dict
from .config import LoraConfig, ModelConfig
from .errors import ConfigError
from .fileio import atomic_directory, atomic_write_text

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_WEIGHTS",
    "RUN_ADAPTER_DIR",
    "AdapterMismatchError",
    "add_lora",
    "base_fingerprint",
    "base_state_dict",
    "is_adapter_directory",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "polymodal-lora"
RUN_ADAPTER_DIR = "adapter"  # where a training run with model.lora writes its adapters alone
_PEFT_ADAPTER = "default"  # peft's name of the one adapter set polymodal keeps per layer


class AdapterMismatchError(ConfigError):
    """An adapter loaded onto a model that is not the base it was trained on."""


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - peft ships with polymodal[lora] and the dev install
        raise ConfigError("LoRA adapters need peft: pip install 'polymodal[lora]'") from None
    return peft


def _target_layers(tower: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """For each target name, the tower's ``nn.Linear`` layers whose name ends with it (peft's matching rule)."""
    linears = [n for n, m in tower.named_modules() if isinstance(m, nn.Linear) and n]
    return {t: [n for n in linears if n == t or n.endswith(f".{t}")] for t in targets}


def _check_tower_type(model: nn.Module, modality: str) -> None:
    # CLIP's ResNet attention pool slices its qkv weight directly (polymodal.encoders.attention), which a
    # wrapped layer's adapter would silently miss; adapters are for the transformer towers.
    from polymodal.encoders import ResNetEncoder

    tower = model.towers[modality]
    if isinstance(tower, ResNetEncoder) or not any(isinstance(m, nn.Linear) for m in tower.modules()):
        raise ConfigError(
            f"lora.towers: the {modality!r} tower is a {type(tower).__name__}; LoRA adapts transformer towers "
            "(ViT, text transformer, Hugging Face text encoder)"
        )


def add_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Add adapters to ``model``'s towers in place (new adapters leave its outputs unchanged) and freeze
    the adapted towers' own weights. ``model.config.lora`` records them, so saving and loading keep them.

    Raises ``ConfigError`` when a tower is missing or not a transformer, when a target matches no linear
    layer of the adapted towers, or when the model already has adapters.
    """
    peft = _peft()
    config = getattr(model, "config", None)
    if config is not None and config.lora is not None and _has_adapters(model):
        raise ConfigError("this model already has LoRA adapters; merge them first (polymodal.lora.merge_lora)")
    towers = getattr(model, "towers", None)
    missing = [m for m in lora.towers if towers is None or m not in towers]
    if missing:
        have = sorted(towers) if towers is not None else []
        raise ConfigError(f"lora.towers names {missing}, which this model lacks; it has {have}")
    layers: dict[str, list[str]] = {}
    matched: dict[str, int] = dict.fromkeys(lora.targets, 0)
    for modality in lora.towers:
        _check_tower_type(model, modality)
        found = _target_layers(model.towers[modality], lora.targets)
        for target, names in found.items():
            matched[target] += len(names)
        layers[modality] = sorted({n for names in found.values() for n in names})
        if not layers[modality]:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.towers[modality].named_modules() if isinstance(m, nn.Linear)}
            )
            raise ConfigError(
                f"lora.targets {lora.targets} match no linear layer of the {modality!r} tower; its linear layers "
                f"are named {linear}"
            )
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        raise ConfigError(f"lora.targets {unmatched} match no linear layer of the towers {lora.towers}")
    for modality in lora.towers:
        tower = model.towers[modality]
        peft_config = peft.LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=layers[modality]
        )
        peft.inject_adapter_in_model(peft_config, tower, adapter_name=_PEFT_ADAPTER)
        for name, param in tower.named_parameters():
            param.requires_grad_("lora_" in name)
    if config is not None:
        config.lora = copy.deepcopy(lora)
    return model


def _has_adapters(model: nn.Module) -> bool:
    layer = _peft().tuners.lora.LoraLayer
    return any(isinstance(m, layer) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of ``model``, by their names in its ``state_dict``."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights without its adapters, under the names the model without adapters has."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights (``polymodal.tasks.model_identity``), the same with or without adapters."""
    from polymodal.tasks.model_identity import state_fingerprint

    return state_fingerprint(base_state_dict(model))


def _base_config(model: nn.Module) -> ModelConfig:
    config = copy.deepcopy(model.config)
    config.lora = None
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into their layers (peft's ``merge``) and drop them, in place: a plain model whose
    outputs equal the adapted model's, and whose config has no ``lora``."""
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for owner in list(model.modules()):
        for child_name, child in list(owner.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge(safe_merge=True)
                setattr(owner, child_name, child.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    if getattr(model, "config", None) is not None:
        model.config.lora = None
    return model


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s adapters alone to ``directory`` (atomically): ``adapter.safetensors`` and
    ``adapter_config.json``.

    Args:
        model: a model with adapters (``add_lora``).
        directory: where to write; refused when it exists, unless ``overwrite``.
        base: where the base model came from, e.g. ``{"model": "runs/demo", "pretrained": None}``; recorded
            so ``polymodal lora merge`` can find it again.
        overwrite: replace an existing directory.
    """
    if getattr(model, "config", None) is None or model.config.lora is None or not _has_adapters(model):
        raise ConfigError("this model has no LoRA adapters to save (add them with model.lora or add_lora)")
    from polymodal import __version__

    data = {
        "format": ADAPTER_FORMAT,
        "polymodal_version": __version__,
        "lora": copy.deepcopy(model.config.lora).__dict__,
        "base": {**dict(base or {}), "fingerprint": base_fingerprint(model)},
        "base_config": _base_config(model).to_dict(),
    }
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_state_dict(lora_state_dict(model), tmp / ADAPTER_WEIGHTS, metadata={"polymodal_version": __version__})
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=True)
    return Path(directory)


def is_adapter_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory, checked; ``ConfigError`` naming what is wrong."""
    from .config import read_json_mapping

    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    data = read_json_mapping(path)
    if data.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a polymodal LoRA adapter (format {data.get('format')!r})")
    for key in ("lora", "base", "base_config"):
        if key not in data:
            raise ConfigError(f"{str(path)!r} lacks {key!r}; expected lora, base and base_config")
    data["lora"] = LoraConfig(**data["lora"])
    data["base_config"] = ModelConfig.from_dict(data["base_config"])
    return data


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in ``directory`` to ``model``, their base, in place.

    Raises ``AdapterMismatchError`` when ``model`` is not that base: another architecture, or the same
    architecture with other weights (its fingerprint differs).
    """
    data = read_adapter_config(directory)
    if getattr(model, "config", None) is None:
        raise AdapterMismatchError(
            "the model was built without a ModelConfig, so it cannot be checked against the adapter's base"
        )
    if model.config.lora is not None:
        raise AdapterMismatchError("the model already has LoRA adapters; load an adapter onto a model without them")
    differ = data["base_config"].architecture_differences(model.config)
    if differ:
        raise AdapterMismatchError(
            f"adapter {str(directory)!r} was trained on another architecture (config fields {differ} differ from "
            f"this model's)"
        )
    fingerprint = base_fingerprint(model)
    if fingerprint != data["base"]["fingerprint"]:
        raise AdapterMismatchError(
            f"adapter {str(directory)!r} was trained on base weights with fingerprint {data['base']['fingerprint']}, "
            f"but this model's weights have fingerprint {fingerprint}: it is not the adapter's base "
            f"(that was {data['base'].get('model')!r})"
        )
    add_lora(model, data["lora"])
    state = read_state_dict(Path(directory) / ADAPTER_WEIGHTS)
    expected_keys = set(lora_state_dict(model))
    if set(state) != expected_keys:
        missing, unexpected = sorted(expected_keys - set(state)), sorted(set(state) - expected_keys)
        raise AdapterMismatchError(
            f"{str(directory)!r}: adapter weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)  # the key check above proved every adapter key fits
    return model
