"""polymodal: multimodal models in PyTorch.

Encoders per modality (``polymodal.encoders``), fusion modules and contrastive losses
(``polymodal.fusion``), tasks (``polymodal.tasks``), data (``polymodal.datasets``), and the
core here: the model registry and resolver (``resolve_model``: any model reference to a model),
assembled models, checkpoints and weight conversion.

The core's names are imported on first use, so ``import polymodal.encoders`` alone stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "captioner": ["CaptioningModel"],
    "checkpoint": ["CheckpointError", "load_state_dict_strict", "read_state_dict"],
    "config": ["ComponentConfig", "InputSpec", "ModelConfig", "PreprocessConfig", "TokenizerConfig", "build_encoder"],
    "deploy": ["DeployedModel", "export_towers"],
    "errors": ["ConfigError", "InputError", "PolymodalError"],
    "export": ["export_model"],
    "factory": [
        "apply_overrides",
        "create_model",
        "create_model_and_transforms",
        "from_pretrained",
        "get_preprocess",
        "get_tokenizer",
        "load_pretrained",
    ],
    "model": [
        "ClassifierOutput",
        "ContrastiveModel",
        "ContrastiveOutput",
        "LateFusionClassifier",
        "build_model",
    ],
    "prune": ["prune_model"],
    "quantize": ["quantize_towers"],
    "registry": ["get_model_config", "list_models", "register_model"],
    "resolver": ["ModelReference", "parse_reference", "resolve_model"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
