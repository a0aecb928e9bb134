"""Evaluation during and after training: zero-shot accuracy and cross-modal retrieval on held-out pairs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from polymodal.tasks import build_zero_shot_classifier, retrieval_metrics, zero_shot_accuracy

from .data import RunData, make_loader


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    modalities: tuple[str, ...],
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Normalised embeddings of every modality for all good samples, with their meta, in dataset order."""
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, batch_size, num_workers, sampler=None)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    meta: list[dict] = []
    try:
        for batch in loader:
            if len(batch) == 0:
                continue
            batch = batch.to(device)
            for m in modalities:
                chunks[m].append(model.encode(m, batch.inputs[m], normalize=True).float().cpu())
            meta.extend(batch.meta)
    finally:
        model.train(was_training)
    if not meta:
        raise ValueError("the evaluation data yielded no usable samples")
    return {m: torch.cat(c) for m, c in chunks.items()}, meta


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer, data: RunData, device: torch.device, batch_size: int = 256, num_workers: int = 0
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on the held-out split, plus the embeddings and meta for plots.

    Metrics: ``retrieval/text_to_<m>/R@k`` and ``retrieval/<m>_to_text/R@k`` (k = 1, 5, 10) with median
    ranks; for each zero-shot attribute ``zeroshot/<attr>/top1`` (and ``top5`` when there are more than
    5 classes) over all held-out samples that carry the attribute, and ``zeroshot/<attr>/unseen_top1``
    over those whose attribute combination never occurred in training.
    """
    if data.eval is None:
        return {}, {}
    other = next(m for m in data.modalities if m != "text")
    emb, meta = embed_dataset(model, data.eval, data.modalities, device, batch_size, num_workers)
    metrics: dict[str, float] = {}
    one_to_one = torch.arange(len(meta))
    for name, (q, g) in {f"text_to_{other}": ("text", other), f"{other}_to_text": (other, "text")}.items():
        for key, value in retrieval_metrics(emb[q], emb[g], one_to_one, ks=(1, 5, 10)).items():
            metrics[f"retrieval/{name}/{key}"] = float(value)
    for attr, (classes, templates) in data.zero_shot.items():
        rows = [i for i, m in enumerate(meta) if m.get(attr) in classes]
        if not rows:
            continue
        weights = build_zero_shot_classifier(model, tokenizer, classes, templates, device=device).float().cpu()
        labels = torch.tensor([classes.index(meta[i][attr]) for i in rows])
        ks = (1, 5) if len(classes) > 5 else (1,)
        for key, value in zero_shot_accuracy(emb[other][rows], labels, weights, top_k=ks).items():
            metrics[f"zeroshot/{attr}/{key}"] = float(value)
        unseen = [j for j, i in enumerate(rows) if data.unseen_key and meta[i].get(data.unseen_key)]
        if unseen:
            acc = zero_shot_accuracy(emb[other][rows][unseen], labels[unseen], weights, top_k=(1,))
            metrics[f"zeroshot/{attr}/unseen_top1"] = float(acc["top1"])
    return metrics, {"embeddings": emb, "meta": meta, "modality": other}
