"""PNG overlays of explanation maps (``polymodal.tasks.explain``) over the image or spectrogram they explain.

Built like ``polymodal.tasks.plots``: matplotlib's object API, never ``pyplot``; each ``*_figure`` returns
the figure, each ``plot_*`` writes it atomically and refuses to replace a file unless ``overwrite=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .plots import save_figure, short_text, to_rgb_array

__all__ = ["explanation_figure", "explanation_grid_figure", "plot_explanation", "plot_explanation_grid"]

ALPHA = 0.5  # of the map over its background: both stay readable


def _map_array(explanation: Any) -> np.ndarray:
    arr = (
        explanation.detach().cpu().float().numpy() if isinstance(explanation, torch.Tensor) else np.asarray(explanation)
    )
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"an explanation map must be 2-D (H, W) or (n_mels, frames), got shape {arr.shape}")
    return arr


def _draw(
    ax: Any,
    explanation: Any,
    background: Any,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    title: str | None,
) -> None:
    arr = _map_array(explanation)
    bg = background.detach().cpu().float().numpy() if isinstance(background, torch.Tensor) else None
    if bg is not None and bg.ndim == 2:  # a spectrogram (n_mels, frames): low frequencies at the bottom
        if bg.shape != arr.shape:
            raise ValueError(f"the map {arr.shape} and the spectrogram {bg.shape} must have one shape")
        ax.imshow(bg, cmap="gray", origin="lower", aspect="auto", interpolation="nearest")
        ax.imshow(arr, cmap="jet", alpha=ALPHA, vmin=0, vmax=1, origin="lower", aspect="auto", interpolation="nearest")
        ax.set_xlabel("frame", fontsize=7)
        ax.set_ylabel("mel bin", fontsize=7)
        ax.tick_params(labelsize=6)
    else:
        rgb = to_rgb_array(background, mean, std, where="background")
        if rgb.shape[:2] != arr.shape:
            raise ValueError(f"the map {arr.shape} and the image {rgb.shape[:2]} must have one size")
        ax.imshow(rgb, interpolation="nearest")
        ax.imshow(arr, cmap="jet", alpha=ALPHA, vmin=0, vmax=1, interpolation="bilinear")
        ax.axis("off")
    if title:
        ax.set_title(short_text(title, 28, lines=2), fontsize=8)


def explanation_figure(
    explanation: Any,
    background: Any,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """The map ``(H, W)`` in [0, 1] drawn over what it explains.

    Args:
        explanation: one map from ``explain``.
        background: the image (a PIL image, a ``(3, H, W)`` tensor, normalised by ``mean``/``std`` if given) or
            the spectrogram ``(n_mels, frames)`` (``input_spectrogram``).
        title: e.g. the text explained.
        mean: the per-channel mean the image tensor was normalised with, to undo it.
        std: the per-channel standard deviation likewise.
    """
    spectrogram = isinstance(background, torch.Tensor) and background.ndim == 2
    fig = Figure(figsize=(5.0, 3.2) if spectrogram else (3.2, 3.4), layout="constrained")
    _draw(fig.add_subplot(1, 1, 1), explanation, background, mean, std, title)
    return fig


def plot_explanation(
    explanation: Any,
    background: Any,
    out_png: str | os.PathLike,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``explanation_figure`` as a PNG at ``out_png``; returns the path."""
    return save_figure(explanation_figure(explanation, background, title, mean, std), out_png, overwrite)


def explanation_grid_figure(
    explanations: Sequence[Any],
    backgrounds: Sequence[Any],
    titles: Sequence[str] | None = None,
    columns: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """Many maps over their inputs, ``columns`` to a row (see ``explanation_figure``)."""
    if len(explanations) != len(backgrounds) or not explanations:
        raise ValueError(f"give one background per map, at least one: {len(explanations)} maps, {len(backgrounds)}")
    if titles is not None and len(titles) != len(explanations):
        raise ValueError(f"{len(titles)} titles for {len(explanations)} maps")
    columns = max(1, min(columns, len(explanations)))
    rows = math.ceil(len(explanations) / columns)
    fig = Figure(figsize=(1.7 * columns, 1.9 * rows), layout="constrained")
    for i, (explanation, background) in enumerate(zip(explanations, backgrounds)):
        ax = fig.add_subplot(rows, columns, i + 1)
        _draw(ax, explanation, background, mean, std, titles[i] if titles is not None else None)
    return fig


def plot_explanation_grid(
    explanations: Sequence[Any],
    backgrounds: Sequence[Any],
    out_png: str | os.PathLike,
    titles: Sequence[str] | None = None,
    columns: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``explanation_grid_figure`` as a PNG at ``out_png``; returns the path."""
    fig = explanation_grid_figure(explanations, backgrounds, titles, columns, mean, std)
    return save_figure(fig, out_png, overwrite)
