"""A plain cross-entropy loop for any classifier, on polymodal's one optimiser recipe (``optim``).

``polymodal.tasks`` holds the classifiers, their metrics and evaluation; how they are optimised
(which parameters get weight decay, the warm-up + cosine schedule) is decided once, in
``polymodal.train.optim``, and this loop asks it. For whole runs (checkpoints, resume, DDP,
mixed precision) use the trainer's ``task: classify`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polymodal.errors import InputError
from polymodal.tasks import model_logits
from polymodal.tasks.embedding import model_device, to_device
from polymodal.tasks.zero_shot import default_label_fn

from .optim import parameter_groups, warmup_cosine_schedule

__all__ = ["build_classifier_optimizer", "train_classifier"]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def build_classifier_optimizer(
    model: nn.Module,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    lr_scales: dict[str, float] | None = None,
    warmup_steps: int | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``optim.parameter_groups`` and its warm-up + cosine schedule over ``steps``.

    Args:
        lr_scales: multipliers of ``lr`` by parameter-name prefix, e.g. ``{"encoder.": 0.1}`` to
            fine-tune a ``ClassificationHead``'s encoder ten times slower than its head.
        warmup_steps: linear warm-up; default 5% of ``steps`` (at least one).
    """
    groups = [g for g in parameter_groups(model, lr, weight_decay, lr_scales) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    return optimizer, warmup_cosine_schedule(optimizer, steps, warmup)


def _labelled(batches: Iterable[Any], label_fn: Callable[[Any], tuple[Inputs, torch.Tensor]]) -> Iterator:
    """``(inputs, labels)`` from ``batches``, passing over them again and again."""
    while True:
        used = 0
        for batch in batches:
            x, labels = label_fn(batch)
            if len(labels):
                used += 1
                yield x, labels
        if not used:
            raise InputError(
                "the batches gave no labelled samples in a whole pass (empty, or a one-shot iterator that ran "
                "out); pass a DataLoader or a list"
            )


def train_classifier(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    label_fn: Callable[[Any], tuple[Inputs, torch.Tensor]] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    lr_scales: dict[str, float] | None = None,
    label_smoothing: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float | None = 1.0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` with cross-entropy for ``steps`` AdamW steps (warm-up then cosine); returns the losses.

    Args:
        model: maps inputs to logits (see ``polymodal.tasks.model_logits``); left in training mode.
        batches: an iterable of batches, iterated again from the start whenever it runs out
            (a ``DataLoader`` reshuffles each time).
        steps: optimiser steps.
        label_fn: ``batch -> (inputs, labels)``; default: batches are ``(inputs, labels)`` pairs.
        lr, weight_decay, lr_scales, warmup_steps: see ``build_classifier_optimizer``.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: clip the global gradient norm (``None``: off).
        device: where to train; default the model's device.
        progress: show a progress bar.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    label_fn = label_fn or default_label_fn
    device = torch.device(device) if device is not None else model_device(model)
    optimizer, schedule = build_classifier_optimizer(model, steps, lr, weight_decay, lr_scales, warmup_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, disable=not progress, desc="train", unit="step") as bar:
        for x, labels in _labelled(batches, label_fn):
            logits = model_logits(model, to_device(x, device))
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {len(losses)}: the loss is {loss.item()}; lower lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) == steps:
                break
    return losses
