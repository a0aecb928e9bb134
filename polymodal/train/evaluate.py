"""Evaluation during and after training: zero-shot accuracy and cross-modal retrieval on held-out pairs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
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


def caption_matches(meta: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Which items are right answers to which captions, in both directions.

    Returns ``(text_to_item, item_to_text)``: for each caption the indices of the items that fit it,
    and for each item the indices of the captions that fit it. When every meta lists the attributes
    its caption states (``mentions``, as the built-in data does, also as a JSON list in an index file
    written by ``polymodal data synth``), an item fits a caption if it has
    each of those attributes: "a red circle" is answered by any red circle, "a small red circle in
    the top left" only by small red circles in the top left. Otherwise an item fits the captions
    identical to its own, as a caption cannot tell apart items it describes equally well.
    """
    n = len(meta)
    mentioned = [_mentions(m) for m in meta]
    if any(x is None for x in mentioned):
        captions = [m.get("caption", i) for i, m in enumerate(meta)]  # without captions: the pair only
        groups: dict = {}
        for i, c in enumerate(captions):
            groups.setdefault(c, []).append(i)
        same = [groups[c] for c in captions]
        return same, same
    names = sorted({a for x in mentioned for a in x})
    codes = {}  # attribute -> (N,) integer code of each item's value
    for a in names:
        values: dict[str, int] = {}
        codes[a] = np.array([values.setdefault(repr(m.get(a)), len(values)) for m in meta])
    fits = np.zeros((n, n), dtype=bool)  # fits[i, j]: item j shows everything caption i says
    for i, attrs in enumerate(mentioned):
        row = np.ones(n, dtype=bool)
        for a in attrs:
            row &= codes[a] == codes[a][i]
        fits[i] = row
    return [np.flatnonzero(r).tolist() for r in fits], [np.flatnonzero(c).tolist() for c in fits.T]


def _mentions(meta: dict) -> list[str] | None:
    """The attribute names a sample's caption states: a list, or a JSON list as index files store it."""
    value = meta.get("mentions")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple)) and all(isinstance(a, str) and a in meta for a in value):
        return list(value)
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer, data: RunData, device: torch.device, batch_size: int = 256, num_workers: int = 0
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on the held-out split, plus the embeddings and meta for plots.

    Metrics: ``retrieval/text_to_<m>/R@k`` and ``retrieval/<m>_to_text/R@k`` (k = 1, 5, 10) with median
    ranks, counting every item that fits a caption as a match (``caption_matches``); for each zero-shot
    attribute ``zeroshot/<attr>/top1`` (and ``top5`` when there are more than 5 classes) over all held-out
    samples that carry the attribute, and ``zeroshot/<attr>/unseen_top1`` over those whose attribute
    combination never occurred in training.
    """
    if data.eval is None:
        return {}, {}
    other = next(m for m in data.modalities if m != "text")
    emb, meta = embed_dataset(model, data.eval, data.modalities, device, batch_size, num_workers)
    metrics: dict[str, float] = {}
    text_to_item, item_to_text = caption_matches(meta)
    directions = {
        f"text_to_{other}": ("text", other, text_to_item),
        f"{other}_to_text": (other, "text", item_to_text),
    }
    for name, (q, g, relevant) in directions.items():
        for key, value in retrieval_metrics(emb[q], emb[g], relevant, ks=(1, 5, 10)).items():
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


def format_metrics(metrics: dict[str, float]) -> list[str]:
    """Readable lines for ``evaluate``'s metrics: zero-shot top-1 (top-5, unseen combinations) per
    attribute, then recall@k with median and mean rank per retrieval direction."""
    lines = []
    for attr in sorted({k.split("/")[1] for k in metrics if k.startswith("zeroshot/")}):
        parts = [f"top-1 {100 * metrics[f'zeroshot/{attr}/top1']:.1f}%"]
        if f"zeroshot/{attr}/top5" in metrics:
            parts.append(f"top-5 {100 * metrics[f'zeroshot/{attr}/top5']:.1f}%")
        if f"zeroshot/{attr}/unseen_top1" in metrics:
            parts.append(f"unseen combinations {100 * metrics[f'zeroshot/{attr}/unseen_top1']:.1f}%")
        lines.append(f"zero-shot by {attr}: " + ", ".join(parts))
    directions = sorted({k.split("/")[1] for k in metrics if k.startswith("retrieval/")}, key=_text_first)
    for direction in directions:
        values = {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"retrieval/{direction}/")}
        recalls = sorted((k for k in values if k.startswith("R@")), key=lambda k: int(k[2:]))
        parts = [f"{k} {100 * values[k]:.1f}%" for k in recalls]
        if "median_rank" in values:
            parts.append(f"median rank {values['median_rank']:g}")
        if "mean_rank" in values:
            parts.append(f"mean rank {values['mean_rank']:.2f}")
        query, _, gallery = direction.partition("_to_")
        lines.append(f"{query} -> {gallery}: " + ", ".join(parts))
    return lines


def _text_first(direction: str) -> tuple[bool, str]:
    return (not direction.startswith("text_"), direction)
