"""The model registry: named configs that ``create_model`` builds. Names are unique."""

from __future__ import annotations

import copy
import json
from importlib import resources

from polymodal.errors import ConfigError, InputError

from .config import ModelConfig

_REGISTRY: dict[str, ModelConfig] = {}


def register_model(config: ModelConfig | dict, name: str | None = None) -> ModelConfig:
    """Add a config under ``name`` (default: ``config.name``); a name can be registered only once."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    name = name or config.name
    if name in _REGISTRY:
        raise InputError(f"a model named {name!r} is already registered")
    config = copy.deepcopy(config)
    config.name = name
    _REGISTRY[name] = config
    return config


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_config(name: str) -> ModelConfig:
    """A copy of the registered config (editing it does not change the registry)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; registered models are {list_models()}")
    return copy.deepcopy(_REGISTRY[name])


def _register_builtin() -> None:
    for entry in sorted(resources.files("polymodal").joinpath("model_configs").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            try:
                register_model(json.loads(entry.read_text()))
            except (ConfigError, json.JSONDecodeError) as err:
                raise ConfigError(f"built-in model config {entry.name}: {err}") from None


_register_builtin()
