"""Evaluation of contrastive models on held-out pairs: zero-shot accuracy and cross-modal retrieval.

The one home of what counts as a right answer in retrieval (``caption_matches``): the metrics
(``evaluate_contrastive``, ``polymodal search --evaluate``) and the picture of them
(``plot_retrieval_examples``) all ask it. The trainer and the commands call the functions here; the
embedding itself is ``polymodal.tasks.embedding.embed_dataset``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classification import classification_metrics, default_top_k
from .embedding import EmbeddedData, embed_dataset, encoder_for, eval_mode, model_device
from .retrieval_metrics import retrieval_metrics
from .zero_shot import ClassificationResult, build_zero_shot_classifier, zero_shot_accuracy

__all__ = [
    "RetrievalExamples",
    "caption_choice_metrics",
    "caption_matches",
    "evaluate_contrastive",
    "format_metrics",
    "label_indices",
    "mentioned_attributes",
    "plot_retrieval_examples",
    "query_modality",
    "retrieval_verdicts",
    "zero_shot_on_labels",
]


def mentioned_attributes(meta: Mapping[str, Any]) -> list[str] | None:
    """The attribute names a sample's caption states (its ``mentions``: a list, or a JSON list as index
    files store it), when each is also in ``meta``; otherwise ``None``."""
    value = meta.get("mentions")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple)) and all(isinstance(a, str) and a in meta for a in value):
        return list(value)
    return None


def caption_matches(meta: Sequence[Mapping[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
    """Which items are right answers to which captions, in both directions.

    Returns ``(text_to_item, item_to_text)``: for each caption the indices of the items that fit it,
    and for each item the indices of the captions that fit it. When every meta lists the attributes
    its caption states (``mentions``, as the built-in data does, also as a JSON list in an index file
    written by ``polymodal data synth``), an item fits a caption if it has each of those attributes:
    "a red circle" is answered by any red circle, "a small red circle in the top left" only by small
    red circles in the top left. Otherwise an item fits the captions identical to its own, as a
    caption cannot tell apart items it describes equally well.
    """
    n = len(meta)
    mentioned = [mentioned_attributes(m) for m in meta]
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


def _wrong_captions(meta: Mapping[str, Any]) -> dict[str, str]:
    """A sample's ``wrong_captions`` (a dict, or a JSON object as index files store it) of non-empty strings."""
    value = meta.get("wrong_captions")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str) and v}


@torch.no_grad()
def caption_choice_metrics(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    item_embeddings: torch.Tensor,
    caption_embeddings: torch.Tensor,
    meta: Sequence[Mapping[str, Any]],
    unseen_key: str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """How often an item is closer to its own caption than to a wrong version of it.

    Each sample's ``meta["wrong_captions"]`` maps a kind to a caption that is wrong for it but close to
    its own (the built-in relation scenes give ``"swap"``: the two objects swapped, the same words in
    another order, and ``"colours"``: their colours exchanged). For each kind, ``choice/<kind>/top1`` is
    the share of those samples whose item embedding has a higher cosine similarity with its own caption
    than with the wrong one (a tie counts as wrong, so 0.5 is chance and a model that ignores word order
    scores 0 on a swap); ``choice/<kind>/seen_top1`` and ``unseen_top1`` split it by ``meta[unseen_key]``,
    and ``choice/<kind>/<layout>_top1`` by ``meta["layout"]`` where the samples have one (the relation
    scenes' ``horizontal``, ``vertical`` and ``size``: a model may read sizes long before positions).

    Args:
        model: a contrastive model with ``encode_text``.
        tokenizer: the model's tokenizer.
        item_embeddings: ``(N, D)`` embeddings of the items (images, sounds).
        caption_embeddings: ``(N, D)`` embeddings of each item's own caption.
        meta: the N samples' meta.
        unseen_key: the meta key marking combinations never seen in training.
        batch_size: wrong captions per ``encode_text`` call.
        device: where to run the text tower; default the model's device.
    """
    wrong = [_wrong_captions(m) for m in meta]
    kinds = sorted({k for w in wrong for k in w})
    if not kinds:
        return {}
    encode_text = encoder_for(model, "text")
    device = torch.device(device) if device is not None else model_device(model)
    items = torch.nn.functional.normalize(item_embeddings.float(), dim=-1)
    right = (items * torch.nn.functional.normalize(caption_embeddings.float(), dim=-1)).sum(-1)  # (N,)
    metrics: dict[str, float] = {}
    with eval_mode(model):
        for kind in kinds:
            rows = [i for i, w in enumerate(wrong) if kind in w]
            texts = [wrong[i][kind] for i in rows]
            emb = torch.cat(
                [
                    encode_text(tokenizer(texts[s : s + batch_size]).to(device), normalize=True).float().cpu()
                    for s in range(0, len(texts), batch_size)
                ]
            )
            index = torch.tensor(rows)
            correct = right[index] > (items[index] * torch.nn.functional.normalize(emb, dim=-1)).sum(-1)
            metrics[f"choice/{kind}/top1"] = float(correct.double().mean())
            splits = {}
            if unseen_key:
                unseen = torch.tensor([bool(meta[i].get(unseen_key)) for i in rows])
                splits = {"seen": ~unseen, "unseen": unseen}
            layouts = [str(meta[i].get("layout", "")) for i in rows]
            for layout in sorted(set(layouts) - {""}):
                splits[layout] = torch.tensor([v == layout for v in layouts])
            for name, keep in splits.items():
                if keep.any():
                    metrics[f"choice/{kind}/{name}_top1"] = float(correct[keep].double().mean())
    return metrics


def query_modality(model: Any, modality: str | None = None) -> str:
    """``modality`` if given, else the tower a text query searches (``model.config.query_modality``)."""
    if modality is not None:
        return modality
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "query_modality"):
        raise ValueError(f"{type(model).__name__} has no config naming its query tower; pass modality=")
    return config.query_modality


@torch.no_grad()
def evaluate_contrastive(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[Any],
    zero_shot: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    unseen_key: str | None = None,
    modality: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], EmbeddedData]:
    """Retrieval and zero-shot metrics of held-out pairs, and the embeddings they came from.

    Metrics: ``retrieval/text_to_<m>/R@k`` and ``retrieval/<m>_to_text/R@k`` (k = 1, 5, 10) with median
    and mean ranks, counting every item that fits a caption as a match (``caption_matches``); for each
    zero-shot attribute ``zeroshot/<attr>/top1`` (and ``top5`` when there are more than 5 classes) over
    the samples whose meta holds one of its classes, and ``zeroshot/<attr>/unseen_top1`` over those
    whose ``meta[unseen_key]`` is true (attribute combinations never seen in training); for samples with
    ``wrong_captions``, ``choice/<kind>/top1`` (``caption_choice_metrics``).

    Args:
        model: a contrastive model with ``encode_text`` and ``encode_<modality>``.
        tokenizer: the model's tokenizer, for the zero-shot prompts.
        batches: batches with ``inputs`` (the modality and ``"text"``) and ``meta``.
        zero_shot: attribute -> (class names, templates).
        unseen_key: the meta key marking unseen combinations.
        modality: the tower that text queries; default ``model.config.query_modality``.
        device: where to run; default the model's device.
        progress: show a progress bar.
    """
    other = query_modality(model, modality)
    data = embed_dataset(model, batches, (other, "text"), device=device, progress=progress, desc="evaluate")
    if len(data) == 0:
        raise ValueError("the evaluation data yielded no usable samples")
    emb, meta = data.embeddings, data.meta
    metrics: dict[str, float] = {}
    text_to_item, item_to_text = caption_matches(meta)
    directions = {
        f"text_to_{other}": ("text", other, text_to_item),
        f"{other}_to_text": (other, "text", item_to_text),
    }
    for name, (q, g, relevant) in directions.items():
        for key, value in retrieval_metrics(emb[q], emb[g], relevant, ks=(1, 5, 10)).items():
            metrics[f"retrieval/{name}/{key}"] = float(value)
    for attr, (classes, templates) in (zero_shot or {}).items():
        rows = [i for i, m in enumerate(meta) if m.get(attr) in classes]
        if not rows:
            continue
        weights = build_zero_shot_classifier(model, tokenizer, classes, templates, device=device).float().cpu()
        labels = torch.tensor([list(classes).index(meta[i][attr]) for i in rows])
        ks = (1, 5) if len(classes) > 5 else (1,)
        for key, value in zero_shot_accuracy(emb[other][rows], labels, weights, top_k=ks).items():
            metrics[f"zeroshot/{attr}/{key}"] = float(value)
        unseen = [j for j, i in enumerate(rows) if unseen_key and meta[i].get(unseen_key)]
        if unseen:
            acc = zero_shot_accuracy(emb[other][rows][unseen], labels[unseen], weights, top_k=(1,))
            metrics[f"zeroshot/{attr}/unseen_top1"] = float(acc["top1"])
    metrics.update(caption_choice_metrics(model, tokenizer, emb[other], emb["text"], meta, unseen_key, device=device))
    return metrics, data


def label_indices(labels: Sequence[Any], class_names: Sequence[str], where: str = "labels") -> torch.Tensor:
    """The class index of each ground-truth class name: ``LongTensor (N,)``.

    A label that is not among ``class_names`` is an error naming every such label (a typo in the class
    names, or a class left out, would otherwise quietly lower the accuracy).
    """
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({str(v) for v in labels if v not in index})
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(
            f"{where} holds labels that are not among the {len(index)} class names: {unknown[:10]}{more}; "
            "add them to the class names or drop those rows"
        )
    return torch.tensor([index[v] for v in labels], dtype=torch.long)


def zero_shot_on_labels(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    embeddings: torch.Tensor,
    labels: Sequence[Any],
    class_names: Sequence[str],
    templates: Sequence[Any],
    where: str = "labels",
    device: torch.device | str | None = None,
) -> ClassificationResult:
    """Zero-shot top-1 (top-5 over more than 5 classes), per-class accuracy and confusion of embedded
    samples against their ground-truth class names.

    Args:
        model: the contrastive model that made ``embeddings`` (its text tower embeds the prompts).
        tokenizer: the model's tokenizer.
        embeddings: ``(N, D)`` embeddings of the samples.
        labels: N class names, each one of ``class_names`` (others are an error naming them).
        class_names: the classes, in the classifier's order.
        templates: prompt templates.
        where: what ``labels`` are, for the error message (e.g. "index.csv, column 'label'").
        device: where to run the text tower.
    """
    names = list(class_names)
    targets = label_indices(labels, names, where)
    if len(targets) != embeddings.shape[0]:
        raise ValueError(f"{len(targets)} labels for {embeddings.shape[0]} embeddings")
    weights = build_zero_shot_classifier(model, tokenizer, names, templates, device=device).float().cpu()
    return classification_metrics(embeddings.float() @ weights.T, targets, names, default_top_k(len(names)))


def format_metrics(metrics: Mapping[str, float]) -> list[str]:
    """Readable lines for ``evaluate_contrastive``'s metrics: zero-shot top-1 (top-5, unseen combinations)
    per attribute, caption-choice accuracy per kind of wrong caption, then recall@k with median and mean rank
    per retrieval direction."""
    lines = []
    for attr in sorted({k.split("/")[1] for k in metrics if k.startswith("zeroshot/")}):
        if f"zeroshot/{attr}/top1" not in metrics:
            continue
        parts = [f"top-1 {100 * metrics[f'zeroshot/{attr}/top1']:.1f}%"]
        if f"zeroshot/{attr}/top5" in metrics:
            parts.append(f"top-5 {100 * metrics[f'zeroshot/{attr}/top5']:.1f}%")
        if f"zeroshot/{attr}/unseen_top1" in metrics:
            parts.append(f"unseen combinations {100 * metrics[f'zeroshot/{attr}/unseen_top1']:.1f}%")
        lines.append(f"zero-shot by {attr}: " + ", ".join(parts))
    for kind in sorted({k.split("/")[1] for k in metrics if k.startswith("choice/")}):
        parts = [f"{100 * metrics[f'choice/{kind}/top1']:.1f}%"]
        for name in ("seen", "unseen"):
            if f"choice/{kind}/{name}_top1" in metrics:
                parts.append(f"{name} combinations {100 * metrics[f'choice/{kind}/{name}_top1']:.1f}%")
        for name in ("horizontal", "vertical", "size"):
            if f"choice/{kind}/{name}_top1" in metrics:
                parts.append(f"{name} {100 * metrics[f'choice/{kind}/{name}_top1']:.1f}%")
        lines.append(f"own caption over its {kind}: " + ", ".join(parts))
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


def retrieval_verdicts(topk_indices: torch.Tensor, relevant: Sequence[Iterable[int]]) -> torch.Tensor:
    """``(Q, k)`` booleans: whether each retrieved item is among its query's right answers."""
    idx = torch.as_tensor(topk_indices)
    if idx.ndim != 2 or idx.shape[0] != len(relevant):
        raise ValueError(f"topk_indices must be (Q, k) for {len(relevant)} queries, got {tuple(idx.shape)}")
    answers = [set(r) for r in relevant]
    return torch.tensor([[int(i) in answers[q] for i in row] for q, row in enumerate(idx.tolist())], dtype=torch.bool)


@dataclass
class RetrievalExamples:
    """What ``plot_retrieval_examples`` drew.

    Attributes:
        path: the PNG.
        queries: the positions of the query captions among the samples.
        indices: ``(Q, k)`` positions of the retrieved items, best first.
        correct: ``(Q, k)`` whether each is a right answer (``caption_matches``): its frame is green.
    """

    path: Path
    queries: list[int]
    indices: torch.Tensor
    correct: torch.Tensor


def plot_retrieval_examples(
    data: EmbeddedData,
    images_of: Callable[[list[int]], list[Any]],
    out_png: str | os.PathLike,
    modality: str = "image",
    num_queries: int = 6,
    k: int = 5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overwrite: bool = False,
) -> RetrievalExamples:
    """A retrieval grid of evaluated samples: ``num_queries`` captions spread over the samples, each with
    its top ``k`` items, framed green exactly when ``caption_matches`` counts them right (as the recall
    metrics do), red otherwise.

    Args:
        data: the embeddings of ``evaluate_contrastive`` (``"text"`` and ``modality``) with their meta.
        images_of: sample positions (sorted, each once) -> their images (tensors normalised with
            ``mean``/``std``, or PIL), in that order; called once, so a stream is read once.
        out_png: where to write the PNG.
        modality: the gallery's tower.
        num_queries: rows of the grid.
        k: items per row.
        mean: per-channel mean the images were normalised with.
        std: per-channel std the images were normalised with.
        overwrite: replace an existing file.
    """
    from .plots import plot_retrieval_grid  # matplotlib only when a grid is drawn

    emb, meta = data.embeddings, data.meta
    queries = list(range(0, len(meta), max(1, len(meta) // num_queries)))[:num_queries]
    sims = emb["text"][queries] @ emb[modality].T  # (Q, N)
    top = sims.topk(min(k, sims.shape[1]), dim=-1).indices  # (Q, k)
    text_to_item, _ = caption_matches(meta)
    correct = retrieval_verdicts(top, [text_to_item[q] for q in queries])
    wanted = sorted(set(top.flatten().tolist()))
    images = dict(zip(wanted, images_of(wanted), strict=True))
    path = plot_retrieval_grid(
        [meta[q].get("caption", str(q)) for q in queries],
        [images[i] for i in top.flatten().tolist()],
        torch.arange(top.numel()).view_as(top),
        out_png,
        correct=correct,
        mean=mean,
        std=std,
        overwrite=overwrite,
    )
    return RetrievalExamples(path=path, queries=queries, indices=top, correct=correct)
