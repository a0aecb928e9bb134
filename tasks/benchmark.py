"""Benchmarks of a contrastive model on a labelled or captioned dataset: zero-shot classification,
image-text retrieval and a linear probe, with the metrics clip_benchmark reports.

Each function takes batches as ``polymodal.datasets.collate_samples`` makes them (``inputs["image"]``,
``inputs["label"]`` for labelled data, ``meta["captions"]`` for captioned data), counts the samples the
datasets skipped by reason, and returns a ``BenchmarkResult``:

- zero-shot: ``top1`` (``top5`` over more than 5 classes), ``mean_per_class_recall`` (the mean over the
  classes present of the share of their images ranked first, i.e. balanced accuracy) and
  ``per_class_recall``; the confusion matrix comes with it;
- retrieval: ``image_to_text/R@k`` (an image is found when any of its captions is in the top k) and
  ``text_to_image/R@k`` (a caption finds its own image), k = 1, 5, 10, with median and mean ranks
  (``polymodal.tasks.retrieval_metrics``, ties counted against the query);
- linear probe: the zero-shot metrics of a logistic-regression head fitted on the training split's
  embeddings (``fit_linear_probe``, its weight decay chosen on a fifth of the training data).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .classification import classification_metrics, default_top_k
from .embedding import embed_dataset, encoder_for, eval_mode, model_device
from .linear_probe import LinearProbe, extract_features, fit_linear_probe, split_validation
from .retrieval_metrics import image_text_retrieval_metrics
from .templates import Template
from .zero_shot import ClassificationResult, build_zero_shot_classifier, check_class_names

__all__ = [
    "BENCHMARK_TASKS",
    "BenchmarkResult",
    "format_benchmark",
    "linear_probe_benchmark",
    "retrieval_benchmark",
    "zero_shot_benchmark",
]

BENCHMARK_TASKS = ("zeroshot", "retrieval", "linear-probe")
RETRIEVAL_KS = (1, 5, 10)
PROBE_SEARCH_FRACTION = 0.2  # share of the training embeddings the weight decay is chosen on


@dataclass
class BenchmarkResult:
    """What a benchmark measured.

    Attributes:
        task: one of ``BENCHMARK_TASKS``.
        metrics: JSON-able metrics (see the module docstring).
        num_samples: images evaluated (the test split's, for a linear probe).
        skipped: reason -> samples the datasets skipped, over every split read.
        classification: top-k, per-class accuracy and confusion of the classification tasks.
        probe: the fitted head of a linear probe.
    """

    task: str
    metrics: dict[str, Any]
    num_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    classification: ClassificationResult | None = None
    probe: LinearProbe | None = None

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_json(self, dataset: str, model: str, **extra: Any) -> dict[str, Any]:
        """The result file's content: ``{"dataset", "model", "task", "metrics", "num_samples", "skipped", ...}``."""
        return {
            "dataset": dataset,
            "model": model,
            "task": self.task,
            "metrics": self.metrics,
            "num_samples": self.num_samples,
            "skipped": dict(sorted(self.skipped.items())),
            **extra,
        }


class _SkipTally:
    """Counts, by reason, the samples each batch of the streams it watches dropped."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def watch(self, batches: Iterable[Any]) -> _Watched:
        return _Watched(batches, self.counts)


class _Watched:
    """``batches`` as they are (and their length, when they have one), counting the skips of each."""

    def __init__(self, batches: Iterable[Any], counts: Counter[str]) -> None:
        self.batches, self.counts = batches, counts

    def __len__(self) -> int:
        return len(self.batches)  # a stream without a length raises TypeError, as embed_dataset expects

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.counts.update(getattr(batch, "skipped", None) or {})
            yield batch


def labelled_images(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images, labels, meta)`` of a collated batch of labelled images (empty when all were skipped)."""
    if not batch.inputs:
        return torch.empty(0), torch.empty(0, dtype=torch.long), []
    return batch.inputs["image"], batch.inputs["label"], batch.meta


def _check_label_range(labels: torch.Tensor, meta: Sequence[dict], num_classes: int) -> None:
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
    if bad:
        first = meta[bad[0]] if bad[0] < len(meta) else {}
        where = ", ".join(f"{k} {v}" for k, v in first.items() if k in ("shard", "key", "path"))
        raise ValueError(
            f"{len(bad)} sample(s) have a class index outside the {num_classes} class names, e.g. label "
            f"{int(labels[bad[0]])}" + (f" ({where})" if where else "") + "; the class names do not fit the data"
        )


def classification_summary(result: ClassificationResult) -> dict[str, Any]:
    """The JSON metrics of a classification: top-k, mean per-class recall and per-class recall."""
    metrics: dict[str, Any] = {f"top{k}": v for k, v in result.topk.items()}
    metrics["mean_per_class_recall"] = sum(result.per_class.values()) / len(result.per_class)
    metrics["per_class_recall"] = dict(result.per_class)
    return metrics


@torch.no_grad()
def zero_shot_benchmark(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[Any],
    class_names: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Zero-shot classification of labelled images into ``class_names`` (see the module docstring).

    Args:
        model: a contrastive model with ``encode_image`` and ``encode_text``.
        tokenizer: the model's tokenizer.
        batches: collated batches of labelled images, labels indexing ``class_names``.
        class_names: the classes, in label order.
        templates: prompt templates (``polymodal.tasks.templates``).
        device: where to run; default the model's device.
        progress: show progress bars.
    """
    names = check_class_names(class_names)
    weights = build_zero_shot_classifier(model, tokenizer, names, templates, device=device, progress=progress)
    tally = _SkipTally()
    data = embed_dataset(
        model,
        tally.watch(batches),
        "image",
        batch_fn=labelled_images,
        device=device,
        progress=progress,
        desc="embedding images",
    )
    if len(data) == 0:
        raise ValueError(f"no usable image to classify (skipped: {dict(tally.counts) or 'none'})")
    _check_label_range(data.labels, data.meta, len(names))
    scores = data.features @ weights.float().cpu().T  # (N, C)
    result = classification_metrics(scores, data.labels, names, default_top_k(len(names)))
    return BenchmarkResult("zeroshot", classification_summary(result), len(data), dict(tally.counts), result)


@torch.no_grad()
def retrieval_benchmark(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[Any],
    text_batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Image-text retrieval over images and their captions (see the module docstring).

    Args:
        model: a contrastive model with ``encode_image`` and ``encode_text``.
        tokenizer: the model's tokenizer.
        batches: collated batches with ``inputs["image"]`` and each image's captions in ``meta["captions"]``.
        text_batch_size: captions embedded at once.
        device: where to run; default the model's device.
        progress: show progress bars.
    """
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be at least 1, got {text_batch_size}")
    tally = _SkipTally()
    images = embed_dataset(
        model,
        tally.watch(batches),
        "image",
        device=device,
        progress=progress,
        desc="embedding images",
    )
    if len(images) == 0:
        raise ValueError(f"no usable image to retrieve (skipped: {dict(tally.counts) or 'none'})")
    captions = [c for m in images.meta for c in m["captions"]]
    text_to_image = torch.tensor([i for i, m in enumerate(images.meta) for _ in m["captions"]], dtype=torch.long)
    chunks = (tokenizer(captions[s : s + text_batch_size]) for s in range(0, len(captions), text_batch_size))
    texts = embed_dataset(
        model,
        chunks,
        "text",
        batch_fn=lambda tokens: (tokens, None, None),
        device=device,
        progress=progress,
        desc="embedding captions",
        total=math.ceil(len(captions) / text_batch_size),
    )
    metrics: dict[str, Any] = image_text_retrieval_metrics(
        images.features, texts.features, text_to_image, ks=RETRIEVAL_KS
    )
    metrics = dict(sorted(metrics.items(), key=lambda kv: not kv[0].startswith("image_to_text")))
    metrics["num_captions"] = len(captions)
    return BenchmarkResult("retrieval", metrics, len(images), dict(tally.counts))


def linear_probe_benchmark(
    model: Any,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any] | None,
    class_names: Sequence[str],
    val_fraction: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """A linear probe on the model's normalised image embeddings, scored on a test split.

    Args:
        model: anything with ``encode_image`` (a contrastive model, or a model with an image tower).
        train_batches: collated batches of labelled training images.
        test_batches: the test split's; ``None`` holds out ``val_fraction`` of the training images instead.
        class_names: the classes, in label order.
        val_fraction: with ``test_batches=None``, the share of images held out for testing.
        weight_decay: the probe's L2 strength; default: the best of ``DEFAULT_WEIGHT_DECAYS`` on a fifth of
            the training images (``DEFAULT_WEIGHT_DECAY`` when there are too few to hold any out).
        seed: the seed of the hold-out splits.
        device: where to run the model; default its device.
        progress: show progress bars.
    """
    names = check_class_names(class_names)
    if test_batches is None and val_fraction is None:
        raise ValueError("a linear probe needs test batches or a val_fraction of the training data to test on")
    encode_image = encoder_for(model, "image")
    device = torch.device(device) if device is not None else model_device(model)
    tally = _SkipTally()

    def features(batches: Iterable[Any], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        with eval_mode(model):
            x, y = extract_features(
                lambda images: encode_image(images, normalize=True),
                tally.watch(batches),
                label_fn=lambda batch: labelled_images(batch)[:2],
                device=device,
                progress=progress,
                desc=desc,
            )
        _check_label_range(y, [], len(names))
        return x, y

    train_x, train_y = features(train_batches, "embedding training images")
    if test_batches is None:
        train_x, train_y, test_x, test_y = split_validation(train_x, train_y, val_fraction, seed=seed)
    else:
        test_x, test_y = features(test_batches, "embedding test images")
    search: dict[str, Any] = {}
    if weight_decay is None:
        try:
            fit_x, fit_y, val_x, val_y = split_validation(train_x, train_y, PROBE_SEARCH_FRACTION, seed=seed)
            search = {"val_features": val_x, "val_labels": val_y}
            train_x, train_y = fit_x, fit_y  # refit on both (fit_linear_probe's refit) after the search
        except ValueError:
            pass  # too few training images to hold a fifth out: the default weight decay
    probe = fit_linear_probe(
        train_x, train_y, len(names), weight_decay=weight_decay, seed=seed, progress=progress, **search
    )
    result = classification_metrics(probe.logits(test_x).cpu(), test_y, names, default_top_k(len(names)))
    metrics = classification_summary(result)
    metrics.update(weight_decay=probe.weight_decay, num_train=probe.num_train)
    return BenchmarkResult("linear-probe", metrics, len(test_y), dict(tally.counts), result, probe)


def format_benchmark(result: BenchmarkResult, max_classes: int = 20) -> list[str]:
    """Readable lines of a result: top-k and mean per-class recall (per-class recall for up to ``max_classes``
    classes), or recall@k with median and mean rank per retrieval direction."""
    m = result.metrics
    if result.task == "retrieval":
        lines = []
        for direction in ("image_to_text", "text_to_image"):
            parts = [f"R@{k} {100 * m[f'{direction}/R@{k}']:.1f}%" for k in RETRIEVAL_KS]
            parts.append(f"median rank {m[f'{direction}/median_rank']:g}")
            parts.append(f"mean rank {m[f'{direction}/mean_rank']:.2f}")
            lines.append(f"{direction.replace('_to_', ' -> ')}: " + ", ".join(parts))
        return lines
    parts = [f"top-{k[3:]} {100 * v:.1f}%" for k, v in m.items() if k.startswith("top")]
    parts.append(f"mean per-class recall {100 * m['mean_per_class_recall']:.1f}%")
    lines = [", ".join(parts)]
    per_class = m["per_class_recall"]
    if len(per_class) <= max_classes:
        lines.append("per-class recall: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in per_class.items()))
    return lines
