"""What a run leaves behind: metrics.jsonl, TensorBoard scalars, report.json and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from polymodal.checkpoint import atomic_write_bytes

log = logging.getLogger("polymodal.train")


class MetricsWriter:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled, self.rows = enabled, []
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; degrade rather than fail a long run
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def last(self, key: str) -> float | None:
        return next((r[key] for r in reversed(self.rows) if key in r), None)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_report(run_dir: Path, report: dict[str, Any], rows: list[dict]) -> None:
    """``report.json`` and, when metrics were logged, ``curves.png`` (every task's losses and metrics)."""
    from polymodal.tasks import plot_curves

    atomic_write_bytes(run_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    if rows:
        plot_curves(rows, run_dir / "curves.png", overwrite=True)


def write_retrieval_grid(run_dir: Path, extras: dict[str, Any], data, model) -> None:
    """``retrieval_grid.png``: the top 5 held-out images for six held-out captions (image data only)."""
    from polymodal.tasks import plot_retrieval_grid

    if not extras or extras.get("modality") != "image":
        return
    emb, meta = extras["embeddings"], extras["meta"]
    queries = list(range(0, len(meta), max(1, len(meta) // 6)))[:6]
    sims = emb["text"][queries] @ emb["image"].T
    top = sims.topk(min(5, sims.shape[1]), dim=-1).indices
    wanted = sorted(set(top.flatten().tolist()))
    images = {i: data.eval[i]["image"] for i in wanted}
    pre = model.config.preprocess
    plot_retrieval_grid(
        [meta[q]["caption"] for q in queries],
        [images[i] for i in top.flatten().tolist()],
        torch.arange(top.numel()).view_as(top),
        run_dir / "retrieval_grid.png",
        correct=top == torch.tensor(queries).unsqueeze(1),
        mean=pre.mean,
        std=pre.std,
        overwrite=True,
    )
