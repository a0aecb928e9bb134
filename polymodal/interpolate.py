"""Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): the weights of two models of one architecture,
averaged, ``(1 - alpha) * A + alpha * B``; e.g. a zero-shot model and its fine-tuned copy, to keep much of
the zero-shot robustness while gaining most of the fine-tuned accuracy."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

__all__ = ["interpolate_models", "interpolate_state"]


def _config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"a {type(model).__name__} built without a ModelConfig cannot be checked for interpolation")
    return config


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for every floating-point tensor; others (counters, ids) must be equal.

    Raises ``ConfigError`` naming the first tensor whose name, shape or dtype differs between the two.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be a number from 0 (the first model) to 1 (the second), got {alpha!r}")
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ConfigError(
            f"the two models' weights are laid out differently: only in the first {only_a[:3]}, "
            f"only in the second {only_b[:3]}"
        )
    out = {}
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ConfigError(
                f"weight {name!r} is {tuple(x.shape)} {x.dtype} in the first model but {tuple(y.shape)} {y.dtype} "
                "in the second; interpolation needs the same layout"
            )
        if x.is_floating_point():
            # exact end points: alpha 0 and 1 return the inputs bit for bit, not x + 1.0 * (y - x)
            out[name] = x.clone() if alpha == 0 else y.clone() if alpha == 1 else torch.lerp(x, y, float(alpha))
        elif torch.equal(x, y):
            out[name] = x.clone()
        else:
            raise ConfigError(f"non-float tensor {name!r} differs between the two models, so it cannot be averaged")
    return out


def interpolate_models(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new model with ``(1 - alpha) * a + alpha * b``'s weights and ``a``'s config.

    Raises ``ConfigError`` when the two differ in architecture (their configs, names aside) or in the layout
    of their weights, or carry LoRA adapters (merge them first: ``polymodal lora merge``).
    """
    for which, model in (("first", a), ("second", b)):
        if getattr(getattr(model, "config", None), "lora", None) is not None:
            raise ConfigError(
                f"the {which} model has LoRA adapters; merge them first (polymodal lora merge), so the whole "
                "weights are averaged rather than the adapters' factors"
            )
    differ = _config(a).architecture_differences(_config(b))
    if differ:
        raise ConfigError(f"the two models differ in architecture (config fields {differ}); interpolation needs one")
    state = interpolate_state(a.state_dict(), b.state_dict(), alpha)
    merged = copy.deepcopy(a)
    merged.load_state_dict(state)
    return merged
