"""The trainer's held-out evaluation: a thin call of ``polymodal.tasks.evaluate_contrastive`` on a run's data.

Only the loader (the trainer's own ``make_loader``) and the shape of the result (the ``extras`` dict the
trainer's reports read) are decided here; the metrics, the relevance of retrieval answers and the
embedding loop live in ``polymodal.tasks.evaluation`` and ``polymodal.tasks.embedding``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polymodal.tasks import evaluate_contrastive

from .data import RunData, make_loader

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer, data: RunData, device: torch.device, batch_size: int = 256, num_workers: int = 0
) -> tuple[dict[str, float], dict[str, Any]]:
    """``evaluate_contrastive`` on ``data.eval`` with the run's zero-shot prompts; ``({}, {})`` without
    held-out data. The extras are ``{"embeddings": {modality: (N, D)}, "meta": [...], "modality": m}``."""
    if data.eval is None:
        return {}, {}
    loader = make_loader(data.eval, batch_size, num_workers, sampler=None)
    # The data's own tower, not model.config.query_modality: a model with several towers (image, audio,
    # text) trained on sound-caption pairs is evaluated on sounds.
    other = next(m for m in data.modalities if m != "text")
    metrics, embedded = evaluate_contrastive(
        model, tokenizer, loader, data.zero_shot, data.unseen_key, modality=other, device=device
    )
    return metrics, {"embeddings": embedded.embeddings, "meta": embedded.meta, "modality": other}
