"""What a run leaves behind: metrics.jsonl, TensorBoard scalars, report.json and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from polymodal.fileio import atomic_write_text

log = logging.getLogger("polymodal.train")


class MetricsWriter:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(
        self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resumed_at: int | None = None
    ) -> None:
        """``resumed_at``: the step a resumed run continues from; its earlier rows are kept (the report and
        curves cover the whole run) and rows after it, from the part that is now repeated, are dropped."""
        self.enabled, self.rows = enabled, []
        self.path = run_dir / "metrics.jsonl"
        if enabled and resumed_at is not None and self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= resumed_at]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows), overwrite=True)
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

    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    if rows:
        plot_curves(rows, run_dir / "curves.png", overwrite=True)


def held_out_images(dataset, meta: list[dict[str, Any]], positions: list[int]) -> list[torch.Tensor]:
    """The images of the evaluated samples at ``positions`` (``meta`` is theirs, in evaluation order).

    A map-style data set is indexed. A stream (WebDataset shards) is read once, and its items are found by
    their ``(url, key)``, not their position, so skipped samples or a shuffle cannot pair a caption with
    another image.
    """
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        return [dataset[i]["image"] for i in positions]
    wanted = {(meta[i].get("url"), meta[i].get("key")): i for i in positions}
    found: dict[int, torch.Tensor] = {}
    for item in dataset:
        where = (item["meta"].get("url"), item["meta"].get("key")) if isinstance(item, dict) else None
        if where in wanted:
            found[wanted.pop(where)] = item["image"]
            if not wanted:
                break
    if wanted:
        raise RuntimeError(f"{len(wanted)} evaluated samples were not found again in the held-out stream")
    return [found[i] for i in positions]


def write_retrieval_grid(run_dir: Path, extras: dict[str, Any], data, model) -> None:
    """``retrieval_grid.png``: the top 5 held-out images for six held-out captions (image data only), framed
    right or wrong by the same relevance the recall metrics use."""
    from polymodal.tasks import EmbeddedData, plot_retrieval_examples

    if not extras or extras.get("modality") != "image":
        return
    pre = model.config.preprocess
    plot_retrieval_examples(
        EmbeddedData(extras["embeddings"], meta=extras["meta"]),
        lambda positions: held_out_images(data.eval, extras["meta"], positions),
        run_dir / "retrieval_grid.png",
        mean=pre.mean,
        std=pre.std,
        overwrite=True,
    )
