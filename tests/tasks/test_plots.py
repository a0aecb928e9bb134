"""PNG plots: valid files written atomically, and retrieval-grid frames in the right colours."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.encoders.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.tasks.plots import (
    CORRECT_COLOR,
    INCORRECT_COLOR,
    curves_figure,
    metric_group,
    plot_confusion,
    plot_curves,
    plot_retrieval_grid,
    plot_similarity_matrix,
)


def open_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 200 <= w <= 5000 and 150 <= h <= 5000, im.size
        return np.asarray(im.convert("RGB"))


def assert_only(directory, *names):
    assert sorted(os.listdir(directory)) == sorted(names)  # no temporary files left behind


def records(n: int = 30) -> list[dict]:
    out = [
        {"step": i, "epoch": i // 10, "train/loss": 2.0 / (i + 1), "lr": 1e-3 * min(1.0, i / 5), "logit_scale": 14.0}
        for i in range(n)
    ]
    out += [{"step": i, "val/top1": i / n, "val/text_to_image/R@1": i / (2 * n)} for i in range(0, n, 10)]
    return out


def test_metric_groups():
    assert metric_group("train/loss") == metric_group("val/contrastive_loss") == "loss"
    assert metric_group("lr") == metric_group("train/lr") == "learning rate"
    assert metric_group("val/top1") == metric_group("val/accuracy") == "accuracy"
    assert metric_group("val/image_to_text/R@5") == "recall"
    assert metric_group("val/text_to_image/median_rank") == "rank"
    assert metric_group("logit_scale") == "logit scale"
    assert metric_group("grad_norm") == "grad_norm"


def test_plot_curves_from_records(tmp_path):
    out = plot_curves(records(), tmp_path / "curves.png", title="demo")
    assert out == tmp_path / "curves.png"
    pixels = open_png(out)
    assert pixels.std() > 10  # something was drawn
    assert_only(tmp_path, "curves.png")


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_a_single_evaluation_is_drawn_as_labelled_values_not_as_a_line():
    """An evaluation that ran once is one number: a bar labelled with its value and step, never a
    one-point "curve" on a meaningless axis."""
    rows = [{"step": i, "train/loss": 2.0 / (i + 1)} for i in range(600)]
    rows.append({"step": 600, "zeroshot/shape/top1": 0.959, "zeroshot/colour/top1": 0.997})
    rows.append({"step": 600, "retrieval/text_to_image/R@1": 0.771})
    axes = _axes_by_title(curves_figure(rows))
    assert set(axes) == {"loss", "accuracy (one evaluation)", "recall (one evaluation)"}
    acc = axes["accuracy (one evaluation)"]
    assert len(acc.lines) == 0  # no Line2D at all
    assert sorted(bar.get_width() for bar in acc.patches) == pytest.approx([0.959, 0.997])
    labels = sorted(t.get_text().strip() for t in acc.texts)
    assert labels == ["0.959 at step 600", "0.997 at step 600"]
    assert [t.get_text() for t in acc.get_yticklabels()] == ["zeroshot/colour/top1", "zeroshot/shape/top1"]
    recall = axes["recall (one evaluation)"]
    assert [b.get_width() for b in recall.patches] == pytest.approx([0.771])
    assert [t.get_text().strip() for t in recall.texts] == ["0.771 at step 600"]
    # the dense loss stays a plain line through all 600 points
    (loss,) = axes["loss"].lines
    assert len(loss.get_xdata()) == 600


def test_repeated_evaluations_are_lines_with_markers():
    rows = [{"step": s, "val/top1": v, "val/text_to_image/R@1": v / 2} for s, v in [(100, 0.5), (300, 0.8), (600, 0.9)]]
    rows.append({"step": 600, "val/top5": 0.99})  # logged once next to a series: one labelled marker
    axes = _axes_by_title(curves_figure(rows))
    acc = axes["accuracy"]
    series = {line.get_label(): line for line in acc.lines}
    top1 = series["val/top1"]
    assert list(top1.get_xdata()) == [100, 300, 600] and list(top1.get_ydata()) == [0.5, 0.8, 0.9]
    assert top1.get_marker() == "o" and top1.get_linestyle() == "-"
    once = series["val/top5"]
    assert list(once.get_xdata()) == [600] and once.get_linestyle() == "None" and once.get_marker() == "D"
    assert [t.get_text() for t in acc.texts] == ["0.99 at step 600"]
    assert len(acc.patches) == 0
    (recall,) = axes["recall"].lines
    assert recall.get_marker() == "o" and len(recall.get_xdata()) == 3


def test_plot_curves_from_jsonl_skips_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in records()]
    path.write_text("\n".join(lines) + "\n\n" + '{"step": 31, "train/lo')  # a write cut short
    with pytest.warns(UserWarning, match="skipped 1 line"):
        out = plot_curves(path, tmp_path / "out" / "curves.png", keys=["train/loss", "val/top1"], x_key="step")
    open_png(out)
    assert_only(tmp_path / "out", "curves.png")


def test_plot_curves_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        plot_curves(records(), target)
    assert target.read_bytes() == b"user data"
    plot_curves(records(), target, overwrite=True)
    open_png(target)
    assert_only(tmp_path, "curves.png")


def test_plot_curves_errors(tmp_path):
    with pytest.raises(ValueError, match=r"keys \['val/missing'\]"):
        plot_curves(records(), tmp_path / "a.png", keys=["val/missing"])
    with pytest.raises(ValueError, match="no metric records"):
        plot_curves([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_curves([{"step": 1, "note": "hi"}], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"end in \.png"):
        plot_curves(records(), tmp_path / "a.jpg")
    assert_only(tmp_path)


BLUE = (40, 90, 200)


def _runs(mask_1d: np.ndarray) -> list[tuple[int, int]]:
    """Start and end (exclusive) of each run of True."""
    padded = np.concatenate([[False], mask_1d, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def test_retrieval_grid_frames_are_green_and_red(tmp_path):
    blue = torch.tensor(BLUE, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    gallery = [
        (blue - mean) / std,  # normalised tensors are un-normalised with mean/std
        Image.new("RGB", (32, 32), BLUE),
        Image.new("RGBA", (32, 32), (*BLUE, 255)),
        (blue - mean) / std,
        Image.new("RGB", (32, 32), BLUE),
    ]
    correct = torch.tensor([[True, False, True], [False, False, True]])
    out = plot_retrieval_grid(
        ["a blue square", "another query with a long text that needs wrapping over several lines"],
        gallery,
        torch.tensor([[0, 1, 2], [3, 4, 0]]),
        tmp_path / "grid.png",
        gallery_captions=[f"caption {i}" for i in range(5)],
        correct=correct,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    )
    pixels = open_png(out).astype(int)
    assert_only(tmp_path, "grid.png")
    is_blue = (np.abs(pixels - np.array(BLUE)) <= 2).all(-1)
    row_runs = _runs(is_blue.any(axis=1))
    col_runs = _runs(is_blue.any(axis=0))
    assert len(row_runs) == 2 and len(col_runs) == 3, (row_runs, col_runs)
    for q, (top, bottom) in enumerate(row_runs):
        mid_y = (top + bottom) // 2
        for j, (left, right) in enumerate(col_runs):
            expected = CORRECT_COLOR if correct[q, j] else INCORRECT_COLOR
            mid_x = (left + right) // 2
            for y, x in [(mid_y, left - 2), (mid_y, right + 1), (top - 2, mid_x), (bottom + 1, mid_x)]:
                assert np.abs(pixels[y, x] - np.array(expected)).max() <= 3, (q, j, y, x, pixels[y, x])


def test_retrieval_grid_without_correctness_and_errors(tmp_path):
    gallery = [torch.rand(3, 16, 16), (torch.rand(1, 16, 16) * 255).to(torch.uint8)]
    out = plot_retrieval_grid(["q"], gallery, [[1, 0]], tmp_path / "g.png")
    pixels = open_png(out).astype(int)
    is_green = (np.abs(pixels - np.array(CORRECT_COLOR)) <= 3).all(-1)
    is_red = (np.abs(pixels - np.array(INCORRECT_COLOR)) <= 3).all(-1)
    assert not is_green.any() and not is_red.any()
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        plot_retrieval_grid(["q"], gallery, [[2, 0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(Q, k\) = \(2, k\)"):
        plot_retrieval_grid(["q", "r"], gallery, [[1, 0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape of topk_indices"):
        plot_retrieval_grid(["q"], gallery, [[1, 0]], tmp_path / "x.png", correct=[[True]])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        plot_retrieval_grid(["q"], [torch.rand(4, 8, 8)], [[0]], tmp_path / "x.png")
    assert_only(tmp_path, "g.png")


def test_similarity_matrix(tmp_path):
    sim = torch.randn(6, 9)
    out = plot_similarity_matrix(sim, tmp_path / "sim.png", [f"img {i}" for i in range(6)], [f"t{i}" for i in range(9)])
    open_png(out)
    plot_similarity_matrix(sim.numpy(), tmp_path / "bare.png")
    with pytest.raises(ValueError, match="5 row labels for 6 rows"):
        plot_similarity_matrix(sim, tmp_path / "x.png", row_labels=list("abcde"))
    with pytest.raises(ValueError, match="2 dimensions"):
        plot_similarity_matrix(torch.randn(3), tmp_path / "x.png")
    assert_only(tmp_path, "sim.png", "bare.png")


def test_confusion(tmp_path):
    confusion = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    out = plot_confusion(confusion, ["cat", "dog", "bird"], tmp_path / "confusion.png")
    open_png(out)
    plot_confusion(confusion, ["cat", "dog", "bird"], tmp_path / "counts.png", normalize=False, title="counts")
    names = [f"class {i}" for i in range(40)]  # no per-cell text beyond 20 classes
    plot_confusion(torch.randint(0, 9, (40, 40)), names, tmp_path / "big.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion(torch.zeros(2, 3), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 class_names for a 3-class"):
        plot_confusion(confusion, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-negative"):
        plot_confusion(-confusion, ["a", "b", "c"], tmp_path / "x.png")
    assert_only(tmp_path, "confusion.png", "counts.png", "big.png")
