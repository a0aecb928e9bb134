"""Who made an embedding: a model's name and short fingerprints of its config and of its weights.

Two embeddings can be compared only if the same model made them. The fingerprints let an index
(``EmbeddingIndex``) refuse queries from another model, including one with the same architecture
but other weights, without storing or re-reading the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["config_fingerprint", "model_identity", "state_fingerprint", "weights_fingerprint"]

_SAMPLES_PER_TENSOR = 1024


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor's name and shape and a strided sample of its values (``state_fingerprint``
    of the model's ``state_dict``)."""
    return state_fingerprint(model.state_dict())


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of every tensor's name and shape and a strided sample of its values.

    Values are hashed in bfloat16 so the same weights in float32 or bfloat16 match; two different
    trainings (or initialisations) differ in practically every sampled value.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(state.items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
            h.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        elif t.numel():
            h.update(t.detach().reshape(-1)[:_SAMPLES_PER_TENSOR].cpu().numpy().tobytes())
    return h.hexdigest()


def _without_none(value: Any) -> Any:
    # Fields added to a config class later (default None) must not change the fingerprint of old configs.
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of a model config dict (keys holding ``None`` left out)."""
    return _digest(json.dumps(_without_none(config), sort_keys=True, default=str).encode())


def model_identity(model: Any, modality: str) -> dict[str, Any]:
    """What identifies the embeddings a model's ``modality`` tower produces (``embed_dim`` is set by the caller).

    Returns:
        ``{"name", "config_fingerprint", "weights_fingerprint", "modality"}``; the fingerprints are
        ``None`` for a model without a ``config.to_dict()`` or without weights.
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    cfg = to_dict() if callable(to_dict) else None
    return {
        "name": str(cfg.get("name")) if cfg else type(model).__name__,
        "config_fingerprint": config_fingerprint(cfg) if cfg else None,
        # an exported model (polymodal.deploy.DeployedModel) carries the fingerprint of the weights it was made from
        "weights_fingerprint": weights_fingerprint(model)
        if isinstance(model, nn.Module)
        else getattr(model, "weights_fingerprint", None),
        "modality": modality,
    }
