"""PNG plots of training and evaluation: metric curves, retrieval grids, similarity and confusion matrices.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` drawn by the Agg
canvas), never through ``pyplot``: nothing here selects a global backend, and no figure is
registered with pyplot's figure manager, so none is left open and the functions are safe in a
headless training job or a notebook with another backend. Each ``*_figure`` function returns the
figure it built (for a notebook, or to inspect); each ``plot_*`` function writes it as a PNG through
``polymodal.fileio.atomic_file``, so a reader never sees half an image, and returns the path. An
existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from polymodal.encoders import ToRGB
from polymodal.fileio import OutputExistsError, atomic_file

CORRECT_COLOR = (0, 200, 0)
INCORRECT_COLOR = (220, 0, 0)

# Keys that count records rather than measure anything; left out when ``keys`` is not given.
_NOT_METRICS = {"epoch", "step", "global_step", "time", "timestamp", "wall_time"}
_GROUP_ORDER = ("loss", "accuracy", "recall", "rank", "learning rate", "logit scale")


def check_png_target(out_png: str | os.PathLike, overwrite: bool) -> Path:
    """``out_png`` as a path, refused unless it ends in .png and (without ``overwrite``) does not exist yet."""
    path = Path(out_png)
    if path.suffix.lower() != ".png":
        raise ValueError(f"out_png must end in .png, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    return path


def save_figure(fig: Figure, out_png: str | os.PathLike, overwrite: bool = False, dpi: int = 100) -> Path:
    """Render ``fig`` as a PNG at ``out_png`` atomically (``polymodal.fileio.atomic_file``); returns the path."""
    path = check_png_target(out_png, overwrite)
    FigureCanvasAgg(fig)  # attach the Agg renderer to this figure only
    with atomic_file(path, overwrite=overwrite) as tmp, open(tmp, "xb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def short_text(text: Any, width: int, lines: int = 1) -> str:
    """``text`` wrapped to at most ``lines`` lines of ``width`` characters, cut with "..." if longer."""
    return "\n".join(textwrap.wrap(str(text), width=width, max_lines=lines, placeholder="...")) or " "


# --------------------------------------------------------------------------------------------- curves


def _load_metrics(metrics: Sequence[Mapping[str, Any]] | str | os.PathLike) -> list[Mapping[str, Any]]:
    if not isinstance(metrics, (str, os.PathLike)):
        records = list(metrics)
        bad = [i for i, r in enumerate(records) if not isinstance(r, Mapping)]
        if bad:
            raise ValueError(f"metrics must be a list of dicts; entries {bad[:10]} are not")
        return records
    records, skipped = [], 0
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    if skipped:
        # A trainer that is still writing leaves a partial last line; plot what is complete.
        warnings.warn(
            f"plot_curves skipped {skipped} line(s) of {str(metrics)!r} that are not JSON objects", stacklevel=3
        )
    return records


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metric_group(key: str) -> str:
    """The subplot a metric goes to: ``"train/loss"`` and ``"val/loss"`` both go to ``"loss"``."""
    name = key.rsplit("/", 1)[-1].lower()
    tokens = set(re.split(r"[^a-z0-9@]+", name))
    if "loss" in name:
        return "loss"
    if "lr" in tokens or "learning_rate" in name:
        return "learning rate"
    if "acc" in name or re.search(r"top-?\d", name):
        return "accuracy"
    if "r@" in name or "recall" in name:
        return "recall"
    if "rank" in name:
        return "rank"
    if "scale" in name or "temperature" in name:
        return "logit scale"
    return key


def curves_figure(
    metrics: Sequence[Mapping[str, Any]] | str | os.PathLike,
    keys: Sequence[str] | None = None,
    x_key: str = "step",
    title: str | None = None,
) -> Figure:
    """The figure ``plot_curves`` writes: one subplot per group of metrics (loss, accuracy, recall, ...).

    A metric logged at two or more steps is a line through its values, with markers up to 30 of
    them. A metric logged once (an evaluation at the end of a run) is no curve: a group whose metrics
    were all logged once is a bar per metric, labelled with its value and the step; in a group that
    also has curves, such a metric is one marker labelled the same way.
    """
    records = _load_metrics(metrics)
    if not records:
        raise ValueError("plot_curves got no metric records")
    present = {k for r in records for k, v in r.items() if _is_number(v)}
    if keys is None:
        keys = sorted(present - _NOT_METRICS - {x_key})
    else:
        missing = [k for k in keys if k not in present]
        if missing:
            raise ValueError(f"keys {missing} have no numeric value in any record; numeric keys are {sorted(present)}")
    if not keys:
        raise ValueError(f"no numeric metrics to plot; the records have keys {sorted({k for r in records for k in r})}")

    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(metric_group(k), []).append(k)
    # The groups one reads first come first; any other metric follows in key order.
    order = {g: i for i, g in enumerate(_GROUP_ORDER)}
    groups = dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    ncols = min(2, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    has_x = any(_is_number(r.get(x_key)) for r in records)
    x_name = x_key if has_x else "record"
    for ax, (group, group_keys) in zip(axes, groups.items()):
        series = {}
        for k in group_keys:
            pts = [
                (r[x_key] if _is_number(r.get(x_key)) else i, r[k])
                for i, r in enumerate(records)
                if _is_number(r.get(k)) and math.isfinite(r[k])
            ]
            if pts:
                series[k] = pts
        if series and all(len(pts) == 1 for pts in series.values()):
            _value_panel(ax, series, x_name)
            ax.set_title(f"{group} (one evaluation)")
            continue
        for k, pts in series.items():
            xs, ys = zip(*pts)
            if len(pts) == 1:
                ax.plot(xs, ys, label=k, marker="D", linestyle="none")
                ax.annotate(
                    _value_label(ys[0], x_name, xs[0]),
                    (xs[0], ys[0]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            else:
                ax.plot(xs, ys, label=k, marker="o" if len(pts) <= 30 else None, markersize=3)
        ax.set_title(group)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
        if len(group_keys) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def _value_label(value: float, x_name: str, x: float) -> str:
    return f"{value:.4g} at {x_name} {x:g}"


def _value_panel(ax: Any, series: Mapping[str, list[tuple[float, float]]], x_name: str) -> None:
    """One horizontal bar per once-logged metric, each labelled with its value and step."""
    names = list(series)
    values = [series[k][0][1] for k in names]
    rows = list(range(len(names)))
    ax.barh(rows, values, color="tab:blue", alpha=0.7)
    ax.set_yticks(rows, [short_text(k, 28) for k in names], fontsize=8)
    ax.invert_yaxis()  # the first metric on top, as in a table
    for row, k in zip(rows, names):
        x, value = series[k][0]
        ax.text(value, row, f" {_value_label(value, x_name, x)}", va="center", ha="left", fontsize=8)
    top = max(values + [0.0])
    ax.set_xlim(min(values + [0.0]), top * 1.6 if top > 0 else 1.0)  # room for the labels
    ax.grid(alpha=0.3, axis="x")


def plot_curves(
    metrics: Sequence[Mapping[str, Any]] | str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Sequence[str] | None = None,
    x_key: str = "step",
    title: str | None = None,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """Write ``curves_figure`` of logged metrics as a PNG.

    Records may hold different keys (validation metrics only every few steps); each metric is
    drawn through the records that have a finite number for it.

    Args:
        metrics: a list of dicts, or the path of a ``metrics.jsonl`` with one JSON object per line
            (lines that do not parse, such as a half-written last line, are skipped with a warning).
        out_png: where to write the PNG.
        keys: metrics to plot; default every numeric key except ``x_key`` and counters like ``epoch``.
        x_key: the x value of each record; records without it use their position.
        title: figure title.
        overwrite: replace an existing file.
        dpi: resolution.
    """
    path = check_png_target(out_png, overwrite)
    return save_figure(curves_figure(metrics, keys, x_key, title), path, overwrite, dpi)


# ------------------------------------------------------------------------------------ retrieval grid


def to_rgb_array(
    image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, where: str = "image"
) -> np.ndarray:
    """An image as ``uint8 (H, W, 3)``: PIL images of any mode, CHW tensors (normalised or not), HWC arrays."""
    if isinstance(image, Image.Image):
        return np.asarray(ToRGB()(image))
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3):
        image = torch.from_numpy(image).permute(2, 0, 1)  # (C, H, W)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{where} must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    x = image.detach().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{where} must be a (3, H, W) or (1, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    else:
        x = x.float()
        if std is not None:
            x = x * torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if mean is not None:
            x = x + torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()  # (H, W, 3)


def framed(arr: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """``arr`` ``(H, W, 3)`` inside a border of ``color`` about 5% of its size wide (at least 2 pixels)."""
    border = max(2, round(0.05 * max(arr.shape[:2])))
    out = np.empty((arr.shape[0] + 2 * border, arr.shape[1] + 2 * border, 3), dtype=np.uint8)
    out[:] = color
    out[border:-border, border:-border] = arr
    return out


def retrieval_grid_figure(
    queries: Sequence[str],
    images: Sequence[Any],
    topk_indices: torch.Tensor | Sequence[Sequence[int]],
    gallery_captions: Sequence[str] | None = None,
    correct: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """The figure ``plot_retrieval_grid`` writes (see there); row q, column j + 1 shows ``topk_indices[q, j]``."""
    idx = torch.as_tensor(topk_indices)
    if idx.ndim != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.shape[0] != len(queries):
        raise ValueError(
            f"topk_indices must be integer (Q, k) = ({len(queries)}, k), got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() == 0:
        raise ValueError("plot_retrieval_grid got no queries or k = 0")
    if idx.min() < 0 or idx.max() >= len(images):
        raise ValueError(f"topk_indices must lie in [0, {len(images)}), got {idx.min().item()}..{idx.max().item()}")
    if gallery_captions is not None and len(gallery_captions) != len(images):
        raise ValueError(f"{len(gallery_captions)} gallery_captions for {len(images)} images")
    if correct is not None:
        correct = torch.as_tensor(correct)
        if correct.shape != idx.shape:
            raise ValueError(
                f"correct must have the shape of topk_indices {tuple(idx.shape)}, got {tuple(correct.shape)}"
            )
        correct = correct.bool()
    num_q, k = idx.shape

    fig = Figure(figsize=(2.6 + 1.7 * k, 1.9 * num_q), layout="constrained")
    grid = fig.add_gridspec(num_q, k + 1, width_ratios=[1.5] + [1.0] * k)
    for q in range(num_q):
        ax = fig.add_subplot(grid[q, 0])
        ax.axis("off")
        ax.text(
            0.0, 0.5, short_text(queries[q], 28, lines=5), va="center", ha="left", fontsize=9, transform=ax.transAxes
        )
        for j in range(k):
            g = int(idx[q, j])
            arr = to_rgb_array(images[g], mean, std, f"images[{g}]")
            if correct is not None:
                arr = framed(arr, CORRECT_COLOR if correct[q, j] else INCORRECT_COLOR)
            ax = fig.add_subplot(grid[q, j + 1])
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if gallery_captions is not None:
                ax.set_title(short_text(gallery_captions[g], 22, lines=2), fontsize=7)
    return fig


def plot_retrieval_grid(
    queries: Sequence[str],
    images: Sequence[Any],
    topk_indices: torch.Tensor | Sequence[Sequence[int]],
    out_png: str | os.PathLike,
    gallery_captions: Sequence[str] | None = None,
    correct: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """One row per query: its text, then its top-k gallery images, framed green (correct) or red.

    Which retrieved items are right is the caller's ``correct``; ``polymodal.tasks.evaluation``
    derives it from the same relevance the retrieval metrics use (``plot_retrieval_examples``).

    Args:
        queries: the Q query texts.
        images: the gallery: PIL images or ``(3, H, W)`` tensors (float in [0, 1] or uint8,
            or normalised with ``mean``/``std``).
        topk_indices: ``(Q, k)`` gallery indices, best first.
        out_png: where to write the PNG.
        gallery_captions: a caption per gallery item, shown above its image.
        correct: ``(Q, k)`` whether each retrieved item is relevant; frames are
            ``CORRECT_COLOR`` / ``INCORRECT_COLOR``; ``None`` for no frames.
        mean: per-channel mean the tensors were normalised with.
        std: per-channel std the tensors were normalised with.
        overwrite: replace an existing file.
        dpi: resolution.
    """
    path = check_png_target(out_png, overwrite)
    fig = retrieval_grid_figure(queries, images, topk_indices, gallery_captions, correct, mean, std)
    return save_figure(fig, path, overwrite, dpi)


# ------------------------------------------------------------------------------------------ matrices


def _tick_labels(ax: Any, labels: Sequence[str] | None, count: int, axis: str) -> None:
    if labels is None:
        return
    if len(labels) != count:
        raise ValueError(f"{len(labels)} {axis} labels for {count} {axis}s")
    fontsize = 8 if count <= 30 else 5
    ticks = list(range(count))
    short = [short_text(lab, 24) for lab in labels]
    if axis == "row":
        ax.set_yticks(ticks, short, fontsize=fontsize)
    else:
        ax.set_xticks(ticks, short, fontsize=fontsize, rotation=90)


def _matrix_size(rows: int, cols: int) -> tuple[float, float]:
    return min(max(4.5, 0.28 * cols + 3.0), 24.0), min(max(3.5, 0.28 * rows + 2.0), 24.0)


def plot_similarity_matrix(
    sim: torch.Tensor | np.ndarray,
    out_png: str | os.PathLike,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """A heat map of an ``(N, M)`` similarity matrix (e.g. images against captions) with a colour bar.

    Args:
        sim: ``(N, M)`` similarities.
        out_png: where to write the PNG.
        row_labels: N labels for the rows.
        col_labels: M labels for the columns.
        title: figure title.
        overwrite: replace an existing file.
        dpi: resolution.
    """
    path = check_png_target(out_png, overwrite)
    arr = _as_array(sim, "sim", 2)
    fig = Figure(figsize=_matrix_size(*arr.shape), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(arr, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    _tick_labels(ax, row_labels, arr.shape[0], "row")
    _tick_labels(ax, col_labels, arr.shape[1], "column")
    if title:
        ax.set_title(title)
    return save_figure(fig, path, overwrite, dpi)


def plot_confusion(
    confusion: torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    out_png: str | os.PathLike,
    normalize: bool = True,
    title: str | None = None,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """A confusion matrix, rows the true class and columns the prediction.

    Args:
        confusion: ``(C, C)`` counts (``ZeroShotResult.confusion``).
        class_names: C names.
        out_png: where to write the PNG.
        normalize: colour by each row's fraction (per-class recall) instead of raw counts; rows
            without samples stay 0.
        title: figure title.
        overwrite: replace an existing file.
        dpi: resolution.
    """
    path = check_png_target(out_png, overwrite)
    counts = _as_array(confusion, "confusion", 2)
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion must be square (C, C), got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("confusion must hold finite non-negative counts")
    if len(class_names) != counts.shape[0]:
        raise ValueError(f"{len(class_names)} class_names for a {counts.shape[0]}-class confusion matrix")
    values = counts
    if normalize:
        support = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, support, out=np.zeros_like(counts, dtype=np.float64), where=support > 0)
    num_classes = counts.shape[0]
    fig = Figure(figsize=_matrix_size(num_classes, num_classes), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "count")
    _tick_labels(ax, class_names, num_classes, "row")
    _tick_labels(ax, class_names, num_classes, "column")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= 20:
        # Write each cell's value, light on dark cells so it stays readable.
        top = 1.0 if normalize else (values.max() or 1.0)
        for r in range(num_classes):
            for c in range(num_classes):
                text = f"{values[r, c]:.2f}" if normalize else f"{int(round(counts[r, c]))}"
                color = "white" if values[r, c] > 0.6 * top else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color=color)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, overwrite, dpi)
