"""Zero-shot classification: class names embedded through prompt templates act as a linear classifier.

Each class becomes the renormalised mean of its text embeddings over all templates (``(C, D)``);
an input is classified by the cosine similarity of its embedding to each class row, scaled by
the model's learned temperature. Nothing here depends on a particular model class: any object
with ``encode_text`` and ``encode_<modality>`` (taking ``normalize=``) works.

Ties. A sample whose true class scores exactly as high as another class is counted as a miss at
top-1 (``rank = 1 + #{other classes scoring >= the true class}``), the same pessimistic rule as
the retrieval metrics, so constant or collapsed embeddings never look accurate.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .embedding import embed_dataset, encoder_for, eval_mode, model_device
from .templates import Template, check_templates, fill_template

DEFAULT_LOGIT_SCALE = 100.0

LabelFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """``class_names`` as a list, checked: non-empty, distinct, non-blank strings."""
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(f"class_names must be a list of strings, got {type(class_names).__name__}: {class_names!r}")
    if len(class_names) == 0:
        raise ValueError("class_names is empty; a zero-shot classifier needs at least one class")
    bad = [(i, c) for i, c in enumerate(class_names) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings; got {bad[:5]} (index, value)")
    duplicates = sorted(c for c, n in Counter(class_names).items() if n > 1)
    if duplicates:
        raise ValueError(f"class_names has duplicates {duplicates[:10]}; each class must appear once")
    return list(class_names)


def check_top_k(top_k: Iterable[int]) -> tuple[int, ...]:
    """The distinct positive k values of ``top_k`` (one int or several), sorted."""
    ks = tuple(top_k) if not isinstance(top_k, int) else (top_k,)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"top_k must be positive integers such as (1, 5), got {top_k!r}")
    return tuple(sorted(set(ks)))


def build_zero_shot_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Embed every class name through every template and average per class.

    Sentences of all classes are batched together; per-class sums are accumulated as batches
    arrive, so memory stays ``(C, D)`` however many templates there are.

    Args:
        model: anything with ``encode_text(tokens, normalize=True)``; put in eval mode for the
            call and every submodule's training flag restored afterwards.
        tokenizer: maps a list of strings to a ``LongTensor (B, L)``.
        class_names: one distinct, non-empty name per class.
        templates: strings with exactly one ``{}`` or callables ``name -> sentence``.
        batch_size: sentences per ``encode_text`` call.
        device: where to run the text encoder; default the model's device.
        progress: show a progress bar.

    Returns:
        ``(C, D)`` float32 classifier weights, each row L2-normalised, in ``class_names`` order.
    """
    names = check_class_names(class_names)
    templates = check_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encode_text = encoder_for(model, "text")
    device = torch.device(device) if device is not None else model_device(model)
    texts = [fill_template(t, c) for c in names for t in templates]  # class-major: C * T sentences
    owner = torch.arange(len(names)).repeat_interleave(len(templates))  # class index of each sentence
    sums = None
    starts = range(0, len(texts), batch_size)
    with torch.no_grad(), eval_mode(model):
        for start in tqdm(starts, disable=not progress, desc="zero-shot classifier", unit="batch"):
            chunk = texts[start : start + batch_size]
            emb = encode_text(tokenizer(chunk).to(device), normalize=True)
            if emb.ndim != 2 or emb.shape[0] != len(chunk):
                raise ValueError(
                    f"encode_text returned shape {tuple(emb.shape)} for {len(chunk)} texts; expected (B, D)"
                )
            # Renormalise in float32 so a half-precision tower still averages unit vectors exactly.
            emb = F.normalize(emb.float(), dim=-1)
            if sums is None:
                sums = emb.new_zeros(len(names), emb.shape[1])
            sums.index_add_(0, owner[start : start + len(chunk)].to(emb.device), emb)
    # The mean over templates and the sum point the same way; only the direction is kept.
    return F.normalize(sums, dim=-1)


def _as_scale(value: torch.Tensor | float) -> float:
    return float(value.detach().reshape(()).item()) if isinstance(value, torch.Tensor) else float(value)


def _model_logit_scale(model: Any) -> float:
    alignment = getattr(model, "alignment", None)
    scale = getattr(alignment, "scale", None)
    return _as_scale(scale()) if callable(scale) else DEFAULT_LOGIT_SCALE


def _model_logit_bias(model: Any) -> float | None:
    bias = getattr(getattr(model, "alignment", None), "logit_bias", None)
    return None if bias is None else _as_scale(bias)


def _per_class(value: float | Sequence[float] | torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(num_classes).clone()
    if t.numel() != num_classes:
        raise ValueError(f"{name} must be one value or one per class ({num_classes}), got {t.numel()} values")
    return t


class ZeroShotClassifier:
    """A model plus zero-shot class weights: logits, probabilities and predictions for raw inputs.

    Probabilities. Single-label (``multi_label=False``): softmax over the scaled cosines.
    Multi-label: an independent sigmoid per class, ``sigmoid(scale * cos + bias_c)``. The bias is,
    in order: the ``logit_bias`` argument (one value or one per class), the model's
    ``alignment.logit_bias`` (a sigmoid-loss model is trained for exactly this), or the bias fitted
    by ``calibrate``. Without any of those (a softmax-trained model, uncalibrated) a data-free
    stand-in centres each sample's logits on their mean over classes, so classes scoring above the
    sample's average get probability above 0.5; call ``calibrate`` with labelled data for
    probabilities that mean something.

    ``predict`` is always the top-1 class ``(B,)``; ``predict_multi`` is ``predict_proba >=
    thresholds`` ``(B, C)``, with the thresholds applied per class.

    Args:
        model: anything with ``encode_text`` and ``encode_<modality>`` taking ``normalize=``.
        tokenizer: maps a list of strings to token ids.
        class_names: one distinct name per class.
        templates: prompt templates (see ``polymodal.tasks.templates``).
        modality: which tower embeds the inputs (``"image"``, ``"audio"``, ...).
        multi_label: whether ``predict_proba`` gives independent sigmoids instead of a softmax.
        thresholds: probability cut-off for ``predict_multi``, one value or one per class.
        logit_scale: similarity multiplier; default the model's ``alignment.scale()``, else 100.
        logit_bias: sigmoid bias for multi-label probabilities, one value or one per class.
        batch_size: sentences per text-encoder call while building the weights.
        device: where to run the model; default the model's device.
        progress: show a progress bar while building the weights.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        templates: Sequence[Template],
        modality: str = "image",
        multi_label: bool = False,
        thresholds: float | Sequence[float] = 0.5,
        logit_scale: float | None = None,
        logit_bias: float | Sequence[float] | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        weights = build_zero_shot_classifier(model, tokenizer, class_names, templates, batch_size, device, progress)
        self._setup(model, weights, class_names, modality, multi_label, thresholds, logit_scale, logit_bias)

    @classmethod
    def from_weights(
        cls,
        model: Any,
        weights: torch.Tensor,
        class_names: Sequence[str],
        modality: str = "image",
        multi_label: bool = False,
        thresholds: float | Sequence[float] = 0.5,
        logit_scale: float | None = None,
        logit_bias: float | Sequence[float] | None = None,
    ) -> ZeroShotClassifier:
        """Wrap already built ``(C, D)`` weights (e.g. saved from ``build_zero_shot_classifier``)."""
        self = cls.__new__(cls)
        self._setup(model, weights, class_names, modality, multi_label, thresholds, logit_scale, logit_bias)
        return self

    def _setup(self, model, weights, class_names, modality, multi_label, thresholds, logit_scale, logit_bias) -> None:
        self.class_names = check_class_names(class_names)
        num_classes = len(self.class_names)
        if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or weights.shape[0] != num_classes:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a ({num_classes}, D) tensor for {num_classes} classes, got {shape}")
        self._encode = encoder_for(model, modality)
        self.model = model
        self.modality = modality
        self.multi_label = multi_label
        self.weights = weights.detach()
        self.logit_scale = float(logit_scale) if logit_scale is not None else _model_logit_scale(model)
        self.thresholds = _per_class(thresholds, num_classes, "thresholds").to(weights.device)
        if (self.thresholds < 0).any() or (self.thresholds > 1).any():
            raise ValueError(f"thresholds are probabilities and must lie in [0, 1], got {self.thresholds.tolist()}")
        if logit_bias is None:
            logit_bias = _model_logit_bias(model)
        self.logit_bias = None if logit_bias is None else _per_class(logit_bias, num_classes, "logit_bias")
        if self.logit_bias is not None:
            self.logit_bias = self.logit_bias.to(weights.device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``encode_<modality>(x, normalize=True)`` in eval mode without gradients: ``(B, D)``."""
        with torch.no_grad(), eval_mode(self.model):
            return self._encode(x.to(self.weights.device), normalize=True)

    def classify_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` of precomputed embeddings ``(B, D)`` (L2-normalised here if they are not)."""
        d = self.weights.shape[1]
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[1] != d:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be (B, {d}) to match the classifier weights, got {shape}")
        emb = F.normalize(embeddings.to(self.weights.device).float(), dim=-1)
        return emb @ self.weights.float().T * self.logit_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarity of each input to each class: ``(B, C)``."""
        return self.classify_embeddings(self.embed(x))

    def proba_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C)`` from ``logits`` (softmax, or per-class sigmoid if multi-label)."""
        if not self.multi_label:
            return logits.softmax(dim=-1)
        if self.logit_bias is not None:
            return torch.sigmoid(logits + self.logit_bias.to(logits.device))
        return torch.sigmoid(logits - logits.mean(dim=-1, keepdim=True))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C)``: rows sum to 1 when single-label, independent when multi-label."""
        return self.proba_from_logits(self.logits(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the highest-scoring class: ``LongTensor (B,)``."""
        return self.logits(x).argmax(dim=-1)

    def predict_multi(self, x: torch.Tensor) -> torch.Tensor:
        """Every class whose probability reaches its threshold: ``BoolTensor (B, C)``."""
        return self.predict_proba(x) >= self.thresholds.to(self.weights.device)

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, targets: torch.Tensor, iterations: int = 50) -> torch.Tensor:
        """Fit one sigmoid bias per class on labelled data and use it for multi-label probabilities.

        Each class's bias minimises the binary cross-entropy of ``sigmoid(scale * cos + b_c)``
        against ``targets[:, c]`` (Newton's method; the problem is convex in ``b_c``). Targets are
        smoothed by one pseudo-count towards 0.5, so a class that is always or never present
        still gets a finite bias.

        Args:
            embeddings: ``(N, D)`` embeddings of labelled inputs.
            targets: ``(N, C)`` multi-hot labels (bool or 0/1).
            iterations: Newton steps.

        Returns:
            The fitted ``(C,)`` bias, also stored as ``logit_bias``.
        """
        logits = self.classify_embeddings(embeddings)  # (N, C)
        if targets.shape != logits.shape:
            raise ValueError(
                f"targets must be (N, C) = {tuple(logits.shape)} multi-hot labels, got {tuple(targets.shape)}"
            )
        n = logits.shape[0]
        y = (targets.to(logits).float() * n + 0.5) / (n + 1)
        bias = torch.zeros(self.num_classes, device=logits.device)
        for _ in range(iterations):
            p = torch.sigmoid(logits + bias)
            grad = (p - y).sum(0)
            hess = (p * (1 - p)).sum(0).clamp_min(1e-6)
            # Far from the optimum the curvature vanishes; cap the step so Newton cannot overshoot wildly.
            bias -= (grad / hess).clamp(-10.0, 10.0)
        self.logit_bias = bias
        return bias


def ranks_of_labels(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's true class, ties counted against it: ``(B,)``."""
    true = scores.gather(1, labels[:, None])  # (B, 1)
    return (scores >= true).sum(dim=1)


def check_labels(labels: torch.Tensor, num_rows: int, num_classes: int, where: str) -> torch.Tensor:
    """``labels`` as a ``LongTensor (num_rows,)`` of class indices in ``[0, num_classes)``, else an error
    naming ``where``."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != num_rows or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"{where}: labels must be integer class indices of shape ({num_rows},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if num_rows and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), got values {labels.min().item()}..{labels.max().item()}"
        )
    return labels.long()


def zero_shot_accuracy(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    classifier_weights: torch.Tensor,
    top_k: Iterable[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy of precomputed embeddings against zero-shot weights, in bounded memory.

    Args:
        embeddings: ``(N, D)`` input embeddings; scaling a row does not change its ranking.
        labels: ``(N,)`` true class indices.
        classifier_weights: ``(C, D)``, used as given (``build_zero_shot_classifier`` normalises them).
        top_k: the k values; ``k >= C`` always counts as a hit.
        chunk_size: rows scored at once (memory ``chunk_size * C``).

    Returns:
        ``{"top1": fraction, "top5": fraction, ...}`` for each k.
    """
    ks = check_top_k(top_k)
    if embeddings.ndim != 2 or classifier_weights.ndim != 2 or embeddings.shape[1] != classifier_weights.shape[1]:
        raise ValueError(
            f"embeddings (N, D) and classifier_weights (C, D) must share D, got "
            f"{tuple(embeddings.shape)} and {tuple(classifier_weights.shape)}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError("zero_shot_accuracy got no embeddings (N = 0)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = check_labels(labels, embeddings.shape[0], classifier_weights.shape[0], "zero_shot_accuracy")
    if not torch.isfinite(embeddings).all() or not torch.isfinite(classifier_weights).all():
        raise ValueError("zero_shot_accuracy got NaN or infinite values in embeddings or classifier_weights")
    weights = classifier_weights.float()
    hits = dict.fromkeys(ks, 0)
    for start in range(0, embeddings.shape[0], chunk_size):
        scores = embeddings[start : start + chunk_size].to(weights.device).float() @ weights.T  # (n, C)
        ranks = ranks_of_labels(scores, labels[start : start + chunk_size].to(weights.device))
        for k in ks:
            hits[k] += int((ranks <= k).sum())
    return {f"top{k}": hits[k] / embeddings.shape[0] for k in ks}


@dataclass
class ClassificationResult:
    """Accuracy of a classifier on labelled data (what ``evaluate_zero_shot`` and
    ``classification_metrics`` return).

    Attributes:
        topk: accuracy (fraction) for each k, always including 1.
        per_class: top-1 accuracy of each class that has at least one sample.
        confusion: ``(C, C)`` counts, rows the true class and columns the top-1 prediction;
            its trace over ``num_samples`` equals ``top1``.
        num_samples: samples evaluated.
        class_names: names of the confusion rows.
    """

    topk: dict[int, float]
    per_class: dict[str, float]
    confusion: torch.Tensor
    num_samples: int
    class_names: list[str] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return self.topk[1]

    @property
    def top5(self) -> float | None:
        return self.topk.get(5)

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for logging: ``{prefix + "top1": ..., prefix + "num_samples": ...}``."""
        out: dict[str, float] = {f"{prefix}top{k}": v for k, v in self.topk.items()}
        out[f"{prefix}num_samples"] = self.num_samples
        return out


ZeroShotResult = ClassificationResult  # the name evaluate_zero_shot has always documented


def top1_predictions(scores: torch.Tensor, labels: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The top-1 prediction consistent with the pessimistic ranks: a tied true class is not chosen."""
    masked = scores.scatter(1, labels[:, None], float("-inf"))
    return torch.where(ranks == 1, labels, masked.argmax(dim=1))


def confusion_counts(labels: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat ``(C * C,)`` counts of (true class, predicted class) pairs."""
    return torch.bincount((labels * num_classes + pred).cpu(), minlength=num_classes**2)


def classification_result(
    hits: Mapping[int, int], confusion: torch.Tensor, num_samples: int, names: list[str]
) -> ClassificationResult:
    """A ``ClassificationResult`` from top-k hit counts and flat ``(C * C,)`` confusion counts."""
    num_classes = len(names)
    confusion = confusion.view(num_classes, num_classes)
    support = confusion.sum(dim=1)
    per_class = {names[c]: confusion[c, c].item() / support[c].item() for c in range(num_classes) if support[c] > 0}
    return ClassificationResult(
        topk={k: h / num_samples for k, h in hits.items()},
        per_class=per_class,
        confusion=confusion,
        num_samples=num_samples,
        class_names=names,
    )


def batch_field(batch: Any, name: str) -> Any:
    """``batch[name]`` of a dict batch or ``batch.name`` of an object batch (the trainer's ``Batch``)."""
    if isinstance(batch, Mapping):
        if name not in batch:
            raise ValueError(f"batch has no {name!r} entry; it has keys {sorted(batch)}")
        return batch[name]
    if not hasattr(batch, name):
        raise ValueError(f"batch of type {type(batch).__name__} has no {name!r} attribute")
    return getattr(batch, name)


def default_label_fn(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ``(inputs, labels)`` pair, as a ``DataLoader`` over a labelled dataset yields."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, labels = batch
        return x, torch.as_tensor(labels)
    raise ValueError(
        f"default_label_fn expects (inputs, labels) pairs, got {type(batch).__name__}; for other "
        "batches pass label_fn, e.g. meta_label_fn(class_names) for batches with inputs and meta"
    )


class BatchLabels:
    """A ``label_fn`` for batches with ``inputs`` and per-sample ``meta``: ``batch -> (inputs, labels)``.

    The one reader of class labels from ``meta``: zero-shot evaluation (``meta_label_fn``), trained
    classifiers and linear probes all use it. Works with ``polymodal.datasets.Batch`` and with plain
    dicts. Sample i's label is ``class_names.index(meta[i][key])``; the inputs are
    ``inputs[modalities]`` (a tensor) when ``modalities`` is one name, or ``{m: inputs[m]}`` when it
    is a list (for ``model(**inputs)``).

    Args:
        class_names: the classifier's classes, in its order.
        key: the meta entry holding the class name (e.g. ``"shape"``).
        modalities: which inputs to pass on.
        skip_unknown: drop samples whose ``meta[key]`` is missing or not a class instead of raising;
            ``num_skipped`` counts them.
    """

    def __init__(
        self, class_names: Sequence[str], key: str, modalities: str | Sequence[str], skip_unknown: bool = False
    ) -> None:
        self.class_names = check_class_names(class_names)
        self.index = {c: i for i, c in enumerate(self.class_names)}
        self.key = key
        self.single = isinstance(modalities, str)
        self.modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        if not self.modalities:
            raise ValueError("modalities is empty; name the input(s) the classifier takes")
        self.skip_unknown = skip_unknown
        self.num_skipped = 0

    def labels(self, meta: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """Rows to keep and their class indices."""
        keep, labels = [], []
        for i, m in enumerate(meta):
            value = m.get(self.key) if isinstance(m, Mapping) else None
            if isinstance(value, str) and value in self.index:
                keep.append(i)
                labels.append(self.index[value])
            elif self.skip_unknown:
                self.num_skipped += 1
            else:
                raise ValueError(
                    f"meta[{i}][{self.key!r}] = {value!r} is not a class; expected one of "
                    f"{self.class_names[:20]} (pass skip_unknown=True to drop such samples)"
                )
        return keep, labels

    def __call__(self, batch: Any) -> tuple[Inputs, torch.Tensor]:
        inputs, meta = batch_field(batch, "inputs"), batch_field(batch, "meta")
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ValueError(f"batch inputs have no {missing}; they have {sorted(inputs)}")
        size = inputs[self.modalities[0]].shape[0]
        if len(meta) != size:
            raise ValueError(f"batch has {len(meta)} meta entries for {size} inputs")
        keep, labels = self.labels(meta)
        chosen = {m: inputs[m] for m in self.modalities}
        if len(keep) < size:
            rows = torch.tensor(keep, dtype=torch.long)
            chosen = {m: x[rows.to(x.device)] for m, x in chosen.items()}
        x = chosen[self.modalities[0]] if self.single else chosen
        return x, torch.tensor(labels, dtype=torch.long)


def meta_label_fn(
    class_names: Sequence[str], modality: str = "image", key: str = "shape", skip_unknown: bool = False
) -> BatchLabels:
    """A ``BatchLabels``: labels from each sample's ``meta[key]``, inputs from ``inputs[modality]``."""
    return BatchLabels(class_names, key, modality, skip_unknown=skip_unknown)


def evaluate_zero_shot(
    model: Any,
    dataloader: Iterable[Any],
    classifier: ZeroShotClassifier | torch.Tensor,
    label_fn: LabelFn | None = None,
    modality: str = "image",
    top_k: Iterable[int] = (1, 5),
    device: torch.device | str | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> ClassificationResult:
    """Top-k accuracy, per-class accuracy and the confusion matrix over a labelled data stream.

    Args:
        model: embeds the inputs with ``encode_<modality>(x, normalize=True)``.
        dataloader: any iterable of batches.
        classifier: a ``ZeroShotClassifier`` or its ``(C, D)`` weights.
        label_fn: ``batch -> (inputs, labels LongTensor (B,))``; default ``default_label_fn``
            for ``(inputs, labels)`` pairs; ``meta_label_fn(class_names)`` reads class names from
            each sample's ``meta``.
        modality: which tower embeds the inputs.
        top_k: the k values; 1 is always included.
        device: where to run the model; default the model's device.
        progress: show a progress bar.
        class_names: names for ``per_class``; default the classifier's, else ``"0"``, ``"1"``, ...
    """
    weights = classifier.weights if isinstance(classifier, ZeroShotClassifier) else classifier
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2:
        raise ValueError(f"classifier must be a ZeroShotClassifier or (C, D) weights, got {type(classifier).__name__}")
    num_classes = weights.shape[0]
    if class_names is None:
        class_names = classifier.class_names if isinstance(classifier, ZeroShotClassifier) else None
    names = [str(i) for i in range(num_classes)] if class_names is None else check_class_names(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a classifier with {num_classes} classes")
    ks = check_top_k((1, *check_top_k(top_k)))
    label_fn = label_fn or default_label_fn
    encoder_for(model, modality)  # an error before any data is read
    weights = weights.detach().float()

    steps = itertools.count()

    def labelled(batch: Any) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, labels = label_fn(batch)
        step = next(steps)
        if len(labels):  # label_fn may drop every sample of a batch
            labels = check_labels(labels, x.shape[0], num_classes, f"batch {step}")
        return x, labels, None

    data = embed_dataset(
        model, dataloader, modality, batch_fn=labelled, device=device, progress=progress, desc="zero-shot eval"
    )
    if len(data) == 0:
        raise ValueError("evaluate_zero_shot got no samples from the dataloader")
    scores = data.features @ weights.cpu().T  # (N, C)
    if not torch.isfinite(scores).all():
        raise ValueError("the model produced NaN or infinite embeddings")
    labels = data.labels
    ranks = ranks_of_labels(scores, labels)
    hits = {k: int((ranks <= k).sum()) for k in ks}
    confusion = confusion_counts(labels, top1_predictions(scores, labels, ranks), num_classes)
    return classification_result(hits, confusion, len(data), names)
