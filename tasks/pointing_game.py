"""The pointing game (Zhang et al., https://arxiv.org/abs/1608.00507): does an explanation map's maximum
fall on the object the text names?

A hit is an image whose map has its largest value (the first such pixel, in row-major order) inside the
named object's mask. The random baseline is the hit rate of a point drawn uniformly over the image: the
mean share of the image the named object covers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.errors import InputError

from .explain import explain

__all__ = ["PointingScore", "pointing_game", "pointing_hits"]


@dataclass(frozen=True)
class PointingScore:
    """The pointing game's result for one method.

    Attributes:
        hits: images whose map peaks inside the named object.
        total: images played.
        baseline: the expected hit rate of a uniformly random point (the mean area share of the objects).
    """

    hits: int
    total: int
    baseline: float

    @property
    def accuracy(self) -> float:
        """The share of images hit."""
        return self.hits / self.total

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "baseline": self.baseline, "hits": self.hits, "total": self.total}


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether each map ``(B, H, W)`` has its maximum inside its mask ``(B, H, W)``."""
    if maps.ndim != 3 or tuple(masks.shape) != tuple(maps.shape):
        raise InputError(
            f"maps and masks must both be (B, H, W) of one size, got {tuple(maps.shape)} and {tuple(masks.shape)}"
        )
    peak = maps.flatten(1).argmax(dim=1, keepdim=True)  # (B, 1)
    return masks.flatten(1).to(torch.bool).gather(1, peak.to(masks.device))[:, 0]


def pointing_game(
    model: nn.Module,
    images: torch.Tensor,
    texts: Sequence[str],
    masks: torch.Tensor,
    tokenizer: Callable[[list[str]], torch.Tensor],
    methods: Sequence[str] = ("gradcam", "rollout"),
    batch_size: int = 64,
    modality: str = "image",
    shifts: int = 1,
    upscale: float = 1.0,
) -> dict[str, PointingScore]:
    """Play the pointing game with each explanation method (``explain``) on ``images``.

    Args:
        model: a contrastive model with an image tower and a text tower.
        images: preprocessed images ``(N, C, H, W)``.
        texts: per image, the text naming one object in it.
        masks: ``(N, H, W)`` bool, that object's pixels at the images' resolution.
        tokenizer: the model's tokenizer.
        methods: explanation methods (``EXPLANATION_METHODS``).
        batch_size: images explained at once.
        modality: the tower the images are for.
        shifts: passed to ``explain``: average over shifted copies for finer ViT maps.
        upscale: passed to ``explain``: explain the images resized by this factor, for finer maps.

    Returns:
        A ``PointingScore`` per method, in the order given.
    """
    if len(texts) != len(images) or len(masks) != len(images):
        raise InputError(
            f"give one text and one mask per image: {len(images)} images, {len(texts)} texts, {len(masks)} masks"
        )
    if tuple(masks.shape[1:]) != tuple(images.shape[-2:]):
        raise InputError(f"masks {tuple(masks.shape[1:])} must have the images' size {tuple(images.shape[-2:])}")
    masks = masks.to(torch.bool).cpu()
    baseline = float(masks.flatten(1).float().mean(dim=1).mean())
    scores = {}
    for method in methods:
        hits = 0
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            maps = explain(
                model,
                modality,
                images[start:stop],
                list(texts[start:stop]),
                tokenizer,
                method,
                shifts=shifts,
                upscale=upscale,
            )
            hits += int(pointing_hits(maps, masks[start:stop]).sum())
        scores[method] = PointingScore(hits, len(images), baseline)
    return scores
