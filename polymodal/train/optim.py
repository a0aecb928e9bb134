"""The one home of how polymodal optimises: AdamW parameter groups (which parameters get weight decay)
and the warm-up + cosine learning-rate schedule. Whatever trains with gradient steps builds its
optimiser and schedule from these functions rather than restating the rule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import OptimSection

# Parameters that are scales, offsets, lookup tables or the temperature: decaying them hurts.
_NO_DECAY_NAMES = ("bias", "logit_scale", "logit_bias", "pos_embed", "cls_token", "token_embedding", "embeddings")


def wants_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices and convolution kernels only, not norms, biases, embeddings, temperature."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in _NO_DECAY_NAMES)


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters: the one weight-decay rule of polymodal.

    For each learning rate, one group decayed by ``weight_decay`` (``wants_weight_decay``) and one not.
    ``lr_scales`` maps parameter-name prefixes to multipliers of ``lr`` (the longest matching prefix
    wins; other parameters get ``lr``).
    """
    lr_scales = lr_scales or {}
    by_scale: dict[float, tuple[list[nn.Parameter], list[nn.Parameter]]] = {1.0: ([], [])}
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefix = max((p for p in lr_scales if name.startswith(p)), key=len, default=None)
            decay, no_decay = by_scale.setdefault(1.0 if prefix is None else float(lr_scales[prefix]), ([], []))
            (decay if wants_weight_decay(name, param) else no_decay).append(param)
    if not any(group for pair in by_scale.values() for group in pair):
        raise ValueError("the model has no trainable parameters (is every tower locked?)")
    groups = []
    for scale, (decay, no_decay) in by_scale.items():
        if scale != 1.0 and not decay and not no_decay:
            continue
        groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr * scale})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr * scale})
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimSection, lr_scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups(model, cfg.lr, cfg.weight_decay, lr_scales)``."""
    groups = parameter_groups(model, cfg.lr, cfg.weight_decay, lr_scales)
    params = [p for group in groups for p in group["params"]]
    # the fused kernel makes one pass over each tensor instead of ~10 (6x faster on CPU for clip-vit-tiny)
    fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params) and all(
        p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of polymodal: each group's ``lr`` times ``cosine_with_warmup``, stepped per update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, min_ratio)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, total_steps: int):
    return warmup_cosine_schedule(optimizer, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (kept in float32 on the same device)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}
