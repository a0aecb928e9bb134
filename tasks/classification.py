"""Classification on top of encoders: a linear head over one encoder, metrics, evaluation and a training loop.

``ClassificationHead`` puts a linear layer on an encoder's pooled output, for example the image
tower of a trained contrastive model (``model.towers["image"]``). With ``freeze_encoder=True`` only
the head trains (a linear probe; ``polymodal.tasks.linear_probe`` does the same much faster on
cached features); otherwise encoder and head are fine-tuned together, usually with a smaller
learning rate for the encoder. Training loops live with the trainer's one optimiser recipe
(``polymodal.train.classifier.train_classifier``, ``lr_scales={"encoder.": 0.1}``).

``evaluate_classifier`` works with any model that maps inputs to logits:
a ``ClassificationHead`` (one tensor in) or a late-fusion classifier (``model(**inputs)``, returning
logits or an output with ``.logits``). Batches become ``(inputs, labels)`` through a ``label_fn``;
``BatchLabels`` reads labels from the ``meta`` of the built-in data's batches.

Metrics follow the zero-shot ones: a sample whose true class ties with another counts as a miss,
``per_class`` is the top-1 accuracy (recall) of each class, and ``confusion`` has the true class in
rows and the prediction in columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .embedding import embed_dataset
from .zero_shot import (
    BatchLabels,
    ClassificationResult,
    check_class_names,
    check_labels,
    check_top_k,
    classification_result,
    confusion_counts,
    default_label_fn,
    ranks_of_labels,
    top1_predictions,
)

__all__ = [
    "BatchLabels",
    "ClassificationHead",
    "ClassificationResult",
    "classification_metrics",
    "default_top_k",
    "evaluate_classifier",
    "model_logits",
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
    names = check_class_names(class_names)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != len(names):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (N, {len(names)}) for {len(names)} classes, got {shape}")
    if logits.shape[0] == 0:
        raise ValueError("classification_metrics got no samples (N = 0)")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    num_classes = len(names)
    labels = check_labels(labels, logits.shape[0], num_classes, "classification_metrics").to(logits.device)
    ks = check_top_k((1, *(default_top_k(num_classes) if top_k is None else check_top_k(top_k))))
    scores = logits.float()
    ranks = ranks_of_labels(scores, labels)
    confusion = confusion_counts(labels, top1_predictions(scores, labels, ranks), num_classes)
    return classification_result({k: int((ranks <= k).sum()) for k in ks}, confusion, logits.shape[0], names)


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
    data = embed_dataset(
        model,
        dataloader,
        encode=lambda x: model_logits(model, x),
        batch_fn=lambda batch: (*label_fn(batch), None),
        device=device,
        progress=progress,
        desc="evaluate",
    )
    if len(data) == 0:
        raise ValueError("evaluate_classifier got no samples from the dataloader")
    return classification_metrics(data.features, data.labels, class_names, top_k)
