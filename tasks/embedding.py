"""Embedding a whole dataset: the one loop that zero-shot evaluation, retrieval, indexes and linear probes share.

``embed_dataset`` runs a model over an iterable of batches without gradients, in eval mode (every
submodule's own training flag restored afterwards), on the model's device, with an optional progress
bar, and returns float32 CPU embeddings with the labels and per-sample metadata the batches carried.

What a batch is, is the caller's choice, through ``batch_fn(batch) -> (inputs, labels, meta)``; the
default reads the batches polymodal's data gives (``inputs`` and ``meta``, as attributes or dict keys)
and ``(inputs, labels)`` pairs. What embeds the inputs is ``model.encode_<modality>(x,
normalize=...)`` for each modality asked for, or any callable ``encode(inputs) -> (B, D)`` (a bare
encoder, a classifier's logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "FEATURES",
    "EmbeddedData",
    "embed_dataset",
    "encoder_for",
    "eval_mode",
    "model_device",
    "split_batch",
    "to_device",
]

FEATURES = "features"  # the key of the embeddings made by an ``encode`` callable rather than a tower

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
BatchParts = tuple[Inputs, Any, Sequence[Mapping[str, Any]] | None]


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode for a block, then restore every submodule's own training flag.

    Restoring per submodule (not ``model.train(was_training)``) keeps e.g. a frozen tower that the
    caller had left in eval mode inside a training model in eval mode.
    """
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: Any) -> torch.device:
    """Where ``model`` lives: the device of its first parameter or buffer (the CPU for anything else)."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


def encoder_for(model: Any, modality: str) -> Callable[..., torch.Tensor]:
    """``model.encode_<modality>``, or an error naming the model's type when it has none."""
    fn = getattr(model, f"encode_{modality}", None)
    if not callable(fn):
        raise ValueError(f"{type(model).__name__} has no encode_{modality}(); cannot embed {modality!r} inputs")
    return fn


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """A tensor, or a dict of tensors, on ``device``."""
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def split_batch(batch: Any) -> BatchParts:
    """``(inputs, labels, meta)`` of a batch with ``inputs`` and ``meta`` (attributes or keys; no labels)
    or of an ``(inputs, labels)`` pair (no meta)."""
    if isinstance(batch, Mapping) and "inputs" in batch:
        return batch["inputs"], None, batch.get("meta")
    if hasattr(batch, "inputs") and hasattr(batch, "meta"):
        return batch.inputs, None, batch.meta
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None
    raise ValueError(
        f"cannot read a batch of type {type(batch).__name__}: expected one with 'inputs' and 'meta' "
        "(as polymodal's data gives) or an (inputs, labels) pair; pass batch_fn for other batches"
    )


@dataclass
class EmbeddedData:
    """What ``embed_dataset`` returns, rows in the order the batches gave them.

    Attributes:
        embeddings: modality (or ``FEATURES``) -> ``(N, D)`` float32 embeddings on the CPU.
        labels: ``(N,)`` labels when the batches carried them, else ``None``.
        meta: one dict per row (empty dicts when the batches carried none).
        num_skipped: samples the batches reported as skipped (their ``num_skipped``).
    """

    embeddings: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    meta: list[dict] = field(default_factory=list)
    num_skipped: int = 0

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def features(self) -> torch.Tensor:
        """The embeddings when there is one kind of them (one modality, or an ``encode`` callable)."""
        if len(self.embeddings) != 1:
            raise ValueError(f"there are embeddings of {sorted(self.embeddings)}; pick one from .embeddings")
        return next(iter(self.embeddings.values()))


def _rows(x: Inputs) -> int:
    if isinstance(x, Mapping):
        return next(iter(x.values())).shape[0] if x else 0
    return x.shape[0]


def _modality_inputs(inputs: Inputs, modality: str, single: bool) -> torch.Tensor:
    if not isinstance(inputs, Mapping):
        if not single:
            raise ValueError(f"the batch inputs are one tensor; cannot tell which is the {modality!r} input")
        return inputs
    if modality not in inputs:
        raise ValueError(f"the batch inputs have no {modality!r}; they have {sorted(inputs)}")
    return inputs[modality]


@torch.no_grad()
def embed_dataset(
    model: Any,
    batches: Iterable[Any],
    modalities: str | Sequence[str] | None = None,
    *,
    encode: Callable[[Inputs], torch.Tensor] | None = None,
    batch_fn: Callable[[Any], BatchParts] | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    require_finite: bool = False,
    progress: bool = False,
    desc: str = "embed",
    total: int | None = None,
) -> EmbeddedData:
    """Embed every sample of ``batches`` (see the module docstring).

    Args:
        model: what runs: ``encode_<modality>`` is looked up on it, it is put in eval mode, and its
            device is where the inputs go.
        batches: any iterable of batches, e.g. a ``DataLoader``; batches without rows are passed over.
        modalities: the towers to embed with, e.g. ``("image", "text")``; ``None`` with ``encode``.
        encode: ``inputs -> (B, D)`` instead of the towers; its result is ``embeddings[FEATURES]``.
        batch_fn: ``batch -> (inputs, labels or None, meta or None)``; default ``split_batch``.
        normalize: passed to ``encode_<modality>``.
        device: where to run; default the model's device.
        require_finite: raise if an embedding holds NaN or an infinity.
        progress: show a progress bar over the batches.
        desc: the progress bar's label, also naming the loop in errors.
        total: batches expected, for the progress bar (default ``len(batches)`` when it has one).

    Returns:
        The embeddings, labels and meta; with no usable sample at all, ``len() == 0`` and ``(0, 0)``
        embeddings (each caller says in its own words what it needed).
    """
    if (modalities is None) == (encode is None):
        raise ValueError("embed_dataset: give either modalities (towers of model) or encode (a callable), not both")
    names = [modalities] if isinstance(modalities, str) else list(modalities or [])
    encoders = {m: encoder_for(model, m) for m in names}
    device = torch.device(device) if device is not None else model_device(model)
    batch_fn = batch_fn or split_batch
    if total is None:
        try:
            total = len(batches)
        except TypeError:  # a stream without a length (a DataLoader of one has __len__, which raises)
            total = None
    keys = names or [FEATURES]
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    labels: list[torch.Tensor] = []
    meta: list[dict] = []
    skipped = 0
    with eval_mode(model):
        for step, batch in enumerate(tqdm(batches, total=total, disable=not progress, desc=desc, unit="batch")):
            skipped += int(getattr(batch, "num_skipped", 0) or 0)
            inputs, batch_labels, batch_meta = batch_fn(batch)
            rows = len(batch_labels) if batch_labels is not None else _rows(inputs)
            if rows == 0:
                continue
            if encode is not None:
                out = {FEATURES: encode(to_device(inputs, device))}
            else:
                out = {
                    m: fn(_modality_inputs(inputs, m, len(names) == 1).to(device), normalize=normalize)
                    for m, fn in encoders.items()
                }
            for key, emb in out.items():
                if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != rows:
                    shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                    raise ValueError(
                        f"{desc}, batch {step}: {key} came out as {shape} for {rows} samples; expected (B, D)"
                    )
                emb = emb.float().cpu()
                if require_finite and not torch.isfinite(emb).all():
                    raise ValueError(f"{desc}, batch {step}: the model produced NaN or infinite {key} embeddings")
                chunks[key].append(emb)
            if batch_labels is not None:
                labels.append(torch.as_tensor(batch_labels))
            if batch_meta is not None:
                meta.extend(dict(m) for m in batch_meta)
            else:
                meta.extend({} for _ in range(rows))
    return EmbeddedData(
        embeddings={k: torch.cat(c) if c else torch.empty(0, 0) for k, c in chunks.items()},
        labels=torch.cat(labels) if labels else None,
        meta=meta,
        num_skipped=skipped,
    )
