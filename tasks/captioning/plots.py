"""A figure of images with their generated captions (and, optionally, the true ones)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..plots import CORRECT_COLOR, INCORRECT_COLOR, check_png_target, framed, save_figure, short_text, to_rgb_array


def caption_figure(
    images: Sequence[Any],
    captions: Mapping[str, Sequence[str]],
    correct: Sequence[bool] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    columns: int = 4,
) -> Figure:
    """A grid of images, each above its captions, one line per source (``"greedy: a red circle"``).

    Args:
        images: PIL images or ``(3, H, W)`` tensors (float in [0, 1] or uint8, or normalised with ``mean``/``std``).
        captions: caption lists keyed by their source, e.g. ``{"greedy": [...], "beam 3": [...], "true": [...]}``,
            each with one caption per image.
        correct: whether each image's (first) caption is right: frames it ``CORRECT_COLOR`` or
            ``INCORRECT_COLOR``; ``None`` for no frames.
        mean: per-channel mean the tensors were normalised with.
        std: per-channel std the tensors were normalised with.
        columns: images per row.
    """
    if not images:
        raise ValueError("caption_figure got no images")
    for source, texts in captions.items():
        if len(texts) != len(images):
            raise ValueError(f"captions[{source!r}] has {len(texts)} captions for {len(images)} images")
    if correct is not None and len(correct) != len(images):
        raise ValueError(f"correct has {len(correct)} entries for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    lines = 2 * len(captions)
    fig = Figure(figsize=(2.7 * columns, rows * (2.2 + 0.16 * lines)), layout="constrained")
    for i, image in enumerate(images):
        arr = to_rgb_array(image, mean, std, f"images[{i}]")
        if correct is not None:
            arr = framed(arr, CORRECT_COLOR if correct[i] else INCORRECT_COLOR)
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(arr, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        text = "\n".join(short_text(f"{source}: {texts[i]}", 34, lines=2) for source, texts in captions.items())
        ax.set_xlabel(text, fontsize=7, loc="left")
    return fig


def plot_captions(
    images: Sequence[Any],
    captions: Mapping[str, Sequence[str]],
    out_png: str | os.PathLike,
    correct: Sequence[bool] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    columns: int = 4,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """Write ``caption_figure`` to a PNG (atomically; an existing file only with ``overwrite=True``)."""
    path = check_png_target(out_png, overwrite)
    return save_figure(caption_figure(images, captions, correct, mean, std, columns), path, overwrite, dpi)
