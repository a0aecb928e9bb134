"""Classification on top of encoders: a linear head over one encoder, metrics, evaluation and a training loop.

``ClassificationHead`` puts a linear layer on an encoder's pooled output, for example the image
tower of a trained contrastive model (``model.towers["image"]``). With ``freeze_encoder=True`` only
the head trains (a linear probe; ``polymodal.tasks.linear_probe`` does the same much faster on
cached features); otherwise encoder and head are fine-tuned together, usually with a smaller
learning rate for the encoder (``param_groups``).

``train_classifier`` and ``evaluate_classifier`` work with any model that maps inputs to logits:
a ``ClassificationHead`` (one tensor in) or a late-fusion classifier (``model(**inputs)``, returning
logits or an output with ``.logits``). Batches become ``(inputs, labels)`` through a ``label_fn``;
``BatchLabels`` reads labels from the ``meta`` of the built-in data's batches.

Metrics follow the zero-shot ones: a sample whose true class ties with another counts as a miss,
``per_class`` is the top-1 accuracy (recall) of each class, and ``confusion`` has the true class in
rows and the prediction in columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .zero_shot import (
    ClassificationResult,
    _check_class_names,
    _check_labels,
    _check_top_k,
    _confusion_counts,
    _field,
    _model_device,
    _ranks_of_labels,
    _result,
    _top1_predictions,
    default_label_fn,
    eval_mode,
)

__all__ = [
    "BatchLabels",
    "ClassificationHead",
    "ClassificationResult",
    "classification_metrics",
    "default_top_k",
    "evaluate_classifier",
    "model_logits",
    "train_classifier",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class ClassificationHead(nn.Module):
    """``logits = head(dropout(encoder(x)))``: a linear classifier over one encoder's pooled output.

    Args:
        encoder: maps inputs to pooled features ``(B, feature_dim)`` (any polymodal encoder).
        num_classes: number of classes.
        freeze_encoder: train the head only; the encoder's parameters stop requiring gradients
            and it stays in eval mode (no dropout, fixed normalisation statistics) even when the
            head is put in training mode.
        dropout: dropout on the features before the head.
        feature_dim: width of the encoder's output; default ``encoder.output_dim``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        freeze_encoder: bool = False,
        dropout: float = 0.0,
        feature_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        feature_dim = feature_dim if feature_dim is not None else getattr(encoder, "output_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(
                f"cannot tell the feature width of {type(encoder).__name__} (no output_dim); pass feature_dim"
            )
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes, device=device, dtype=dtype)
        self.encoder_frozen = False
        if freeze_encoder:
            self.freeze_encoder()

    @classmethod
    def from_linear(cls, encoder: nn.Module, linear: nn.Linear, freeze_encoder: bool = True) -> ClassificationHead:
        """Wrap an already trained linear layer (e.g. ``LinearProbe.head``) with its encoder."""
        model = cls(encoder, linear.out_features, freeze_encoder=freeze_encoder, feature_dim=linear.in_features)
        model.head.load_state_dict(linear.state_dict())
        return model.to(device=linear.weight.device)

    def freeze_encoder(self) -> None:
        """Stop training the encoder: no gradients, and eval mode from now on."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder_frozen = True
        self.encoder.eval()

    def train(self, mode: bool = True) -> ClassificationHead:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled output ``(B, feature_dim)`` (without gradients when the encoder is frozen)."""
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        feats = self.features(x)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(
                f"the encoder returned shape {tuple(feats.shape)}; the head expects (B, {self.feature_dim})"
            )
        return self.head(self.dropout(feats))

    def param_groups(
        self, head_lr: float, encoder_lr: float | None = None, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups: the head at ``head_lr``, the encoder at ``encoder_lr`` (default the same).

        Weight decay applies to matrices only (not biases, norms, embeddings); frozen parameters are left out.
        """
        encoder_lr = head_lr if encoder_lr is None else encoder_lr
        groups = []
        for part, lr in ((self.head, head_lr), (self.encoder, encoder_lr)):
            params = [p for p in part.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            rest = [p for p in params if p.ndim < 2]
            groups += [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},) if g["params"]]
            groups += [g for g in ({"params": rest, "lr": lr, "weight_decay": 0.0},) if g["params"]]
        return groups


def default_top_k(num_classes: int) -> tuple[int, ...]:
    """``(1, 5)`` when there are more than 5 classes (top-5 of 5 classes is always right), else ``(1,)``."""
    return (1, 5) if num_classes > 5 else (1,)


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    top_k: Iterable[int] | None = None,
) -> ClassificationResult:
    """Top-k accuracy, per-class accuracy and the confusion matrix of ``logits (N, C)`` against ``labels (N,)``.

    Args:
        logits: class scores; any monotone transform (probabilities) gives the same result.
        labels: true class indices.
        class_names: C names.
        top_k: the k values (1 is always included); default ``default_top_k(C)``.
    """
    names = _check_class_names(class_names)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != len(names):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (N, {len(names)}) for {len(names)} classes, got {shape}")
    if logits.shape[0] == 0:
        raise ValueError("classification_metrics got no samples (N = 0)")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    num_classes = len(names)
    labels = _check_labels(labels, logits.shape[0], num_classes, "classification_metrics").to(logits.device)
    ks = _check_top_k((1, *(default_top_k(num_classes) if top_k is None else _check_top_k(top_k))))
    scores = logits.float()
    ranks = _ranks_of_labels(scores, labels)
    confusion = _confusion_counts(labels, _top1_predictions(scores, labels, ranks), num_classes)
    return _result({k: int((ranks <= k).sum()) for k in ks}, confusion, logits.shape[0], names)


class BatchLabels:
    """A ``label_fn`` for batches with ``inputs`` and per-sample ``meta``: ``batch -> (inputs, labels)``.

    Works with ``polymodal.datasets.Batch`` and with plain dicts. Sample i's label is
    ``class_names.index(meta[i][key])``; the inputs are ``inputs[modalities]`` (a tensor) when
    ``modalities`` is one name, or ``{m: inputs[m]}`` when it is a list (for ``model(**inputs)``).

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
        self.class_names = _check_class_names(class_names)
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
        inputs, meta = _field(batch, "inputs"), _field(batch, "meta")
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


def _to(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _endless(batches: Iterable[Any], label_fn: Callable[[Any], tuple[Inputs, torch.Tensor]]):
    """``(inputs, labels)`` from ``batches``, passing over them again and again; an error if a pass gives nothing."""
    while True:
        used = 0
        for batch in batches:
            x, labels = label_fn(batch)
            if len(labels):
                used += 1
                yield x, labels
        if not used:
            raise ValueError(
                "the batches gave no labelled samples in a whole pass (empty, or a one-shot iterator that ran "
                "out); pass a DataLoader or a list"
            )


def model_logits(model: Callable[..., Any], x: Inputs) -> torch.Tensor:
    """``model(**x)`` for a dict of inputs, else ``model(x)``; the ``.logits`` of an output object."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"the model must return logits (B, C) or an output with .logits, got {type(out).__name__}")
    return logits


def evaluate_classifier(
    model: Callable[..., Any],
    dataloader: Iterable[Any],
    class_names: Sequence[str],
    label_fn: Callable[[Any], tuple[Inputs, torch.Tensor]] | None = None,
    top_k: Iterable[int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ClassificationResult:
    """Run ``model`` over a labelled data stream (in eval mode, no gradients) and score its logits.

    Args:
        model: maps inputs to logits (see ``model_logits``); training flags are restored afterwards.
        dataloader: any iterable of batches.
        class_names: names of the model's classes, in its order.
        label_fn: ``batch -> (inputs, labels)``; default: batches are already ``(inputs, labels)`` pairs.
        top_k: the k values; default ``default_top_k(C)``.
        device: where to run the model; default the model's device.
        progress: show a progress bar.
    """
    label_fn = label_fn or default_label_fn
    device = torch.device(device) if device is not None else _model_device(model)
    all_logits, all_labels = [], []
    with torch.no_grad(), eval_mode(model):
        for batch in tqdm(dataloader, disable=not progress, desc="evaluate", unit="batch"):
            x, labels = label_fn(batch)
            if len(labels) == 0:
                continue
            all_logits.append(model_logits(model, _to(x, device)).float().cpu())
            all_labels.append(torch.as_tensor(labels))
    if not all_logits:
        raise ValueError("evaluate_classifier got no samples from the dataloader")
    return classification_metrics(torch.cat(all_logits), torch.cat(all_labels), class_names, top_k)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then a cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_classifier(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    label_fn: Callable[[Any], tuple[Inputs, torch.Tensor]] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    param_groups: list[dict[str, Any]] | None = None,
    label_smoothing: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float | None = 1.0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` with cross-entropy for ``steps`` AdamW steps (warm-up then cosine); returns the losses.

    Args:
        model: maps inputs to logits (see ``model_logits``); left in training mode.
        batches: an iterable of batches, iterated again from the start whenever it runs out
            (a ``DataLoader`` reshuffles each time).
        steps: optimiser steps.
        label_fn: ``batch -> (inputs, labels)``; default: batches are ``(inputs, labels)`` pairs.
        lr: peak learning rate of every group without its own ``lr``.
        weight_decay: AdamW decay of matrices (not biases or norms) when ``param_groups`` is not given.
        param_groups: AdamW groups, e.g. ``ClassificationHead.param_groups(head_lr, encoder_lr)``.
        label_smoothing: cross-entropy label smoothing.
        warmup_steps: linear warm-up; default 5% of ``steps``.
        grad_clip: clip the global gradient norm (``None``: off).
        device: where to train; default the model's device.
        progress: show a progress bar.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    label_fn = label_fn or default_label_fn
    device = torch.device(device) if device is not None else _model_device(model)
    if param_groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        param_groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(param_groups, lr=lr)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    params = [p for g in param_groups for p in g["params"]]
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, disable=not progress, desc="train", unit="step") as bar:
        for x, labels in _endless(batches, label_fn):
            logits = model_logits(model, _to(x, device))
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {len(losses)}: the loss is {loss.item()}; lower lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) == steps:
                break
    return losses
