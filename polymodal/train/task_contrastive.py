"""The contrastive task (``task: contrastive``, the default): CLIP / SigLIP pre-training of a ``ContrastiveModel``."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polymodal.datasets import Batch
from polymodal.factory import get_preprocess, get_tokenizer
from polymodal.fusion import clip_loss, siglip_loss
from polymodal.resolver import resolve_model
from polymodal.tasks import format_metrics

from .data import RunData, build_datasets
from .evaluate import evaluate as evaluate_heldout
from .report import write_retrieval_grid
from .tasks import ForwardRngState, TrainTask, finish_model, register_task, split_batch

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


def stable_id(value: Any) -> int:
    """A non-negative 63-bit id of ``value`` that is the same in every process and run (Python's ``hash`` of a
    string is salted per process).

    The id is that of its ``str``, or for a list or dict of its JSON text with sorted keys: the text a CSV
    cell written by ``write_synthetic`` holds, so an attribute gets the same id from an index file, from a
    shard's json member and from the generated data.
    """
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, dict)) else str(value)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def _frozen_buffers(model: nn.Module):
    """Restore buffers (BatchNorm statistics) after a recomputed forward, so it does not count twice."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


@dataclass
class StepEmbeddings:
    """What a contrastive loss is computed from: one forward pass's outputs, in float32.

    ``ContrastiveTask.accumulated_backward`` (GradCache) caches them per micro-batch, joins them into the
    whole batch's and sends the loss's gradient back through them, so a task whose loss is a function of
    these alone (the distillation task) gets exact accumulation by overriding ``step_embeddings`` and
    ``loss_from_embeddings``.

    Attributes:
        embeddings: ``{modality: (B, D)}``, L2-normalised.
        logit_scale: the similarity multiplier, a scalar shared by every sample.
        logit_bias: the sigmoid loss's bias, or ``None``.
        extra: more per-sample tensors ``{name: (B, ...)}`` that a subclass's loss reads.
        negatives: ``{modality: (B, N, D)}`` L2-normalised embeddings of each sample's hard negatives.
        groups: ``(B,)`` group ids (``data.group_by``), or ``None``: each sample is its own group.
    """

    embeddings: dict[str, torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    negatives: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: torch.Tensor | None = None

    def per_sample(self) -> dict[str, torch.Tensor]:
        """Every tensor with a row per sample, keyed ``embeddings/<modality>``, ``negatives/<modality>``,
        ``groups/`` (integer: it gets no gradient) and ``extra/<name>``."""
        rows = {f"embeddings/{m}": e for m, e in self.embeddings.items()}
        rows |= {f"negatives/{m}": e for m, e in self.negatives.items()}
        rows |= {} if self.groups is None else {"groups/": self.groups}
        return rows | {f"extra/{k}": v for k, v in self.extra.items()}

    def shared(self) -> dict[str, torch.Tensor]:
        """The scalars every sample shares: ``logit_scale`` and, when there is one, ``logit_bias``."""
        bias = {} if self.logit_bias is None else {"logit_bias": self.logit_bias}
        return {"logit_scale": self.logit_scale, **bias}

    @classmethod
    def from_tensors(cls, per_sample: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> StepEmbeddings:
        """The inverse of ``per_sample`` and ``shared``."""
        parts: dict[str, dict[str, torch.Tensor]] = {"embeddings": {}, "extra": {}, "negatives": {}, "groups": {}}
        for key, value in per_sample.items():
            part, name = key.split("/", 1)
            parts[part][name] = value
        return cls(
            parts["embeddings"],
            shared["logit_scale"],
            shared.get("logit_bias"),
            parts["extra"],
            parts["negatives"],
            parts["groups"].get(""),
        )


@register_task
class ContrastiveTask(TrainTask):
    """Align the towers of ``cfg.model.name`` with the CLIP (``optim.loss: clip``) or sigmoid loss.

    Takes no ``task_args``. Evaluation: zero-shot accuracy per attribute of the built-in data and
    cross-modal retrieval recall on the held-out split. Subclasses change the loss by overriding
    ``step_embeddings`` and ``loss_from_embeddings``; gradient accumulation stays exact.
    """

    name = "contrastive"
    output_names = ("retrieval_grid.png",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.parse_task_args(cfg.task_args)
        if not cfg.model.name:
            raise ValueError(f"task {self.name} needs model.name (a registered model such as clip-vit-tiny)")
        self.tokenizer = None

    def parse_task_args(self, args: dict[str, Any]) -> None:
        """Check (and keep) ``task_args``; the contrastive task takes none."""
        if args:
            raise ValueError(f"task contrastive takes no task_args, got {sorted(args)}")

    def build_model(self, device: torch.device) -> nn.Module:
        cfg = self.cfg.model
        model = resolve_model(cfg.name, pretrained=cfg.pretrained, device=device, **cfg.overrides)
        if not hasattr(model, "alignment"):
            raise ValueError(f"task {self.name} needs a contrastive model; {cfg.name!r} is a {type(model).__name__}")
        for modality, unlocked in cfg.lock.items():
            model.lock_tower(modality, unlocked_layers=unlocked)
        return finish_model(model, cfg)

    def build_data(self, model: nn.Module) -> RunData:
        model = self.contrastive_model(model)
        self.tokenizer = get_tokenizer(model)
        modality = model.config.query_modality
        augment = self.cfg.data.augment
        train_tf = get_preprocess(model, modality, is_train=augment) if modality == "image" else None
        eval_tf = get_preprocess(model, modality, is_train=False) if modality == "image" else None
        data = build_datasets(self.cfg.data, model.config, self.tokenizer, train_tf, eval_tf)
        missing = sorted(set(data.modalities) - set(model.towers))
        if missing:
            raise ValueError(f"the data has {missing} but model {self.cfg.model.name!r} has towers {model.modalities}")
        return data

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's inputs for ``batch``: each modality's, with the hard-negative captions (``(B, N, L)``
        ``text_negatives``) appended to the text batch, so one forward pass embeds both."""
        inputs = {m: batch.inputs[m] for m in self.modalities(batch)}
        negatives = batch.inputs.get("text_negatives")
        if negatives is not None:
            inputs["text"] = torch.cat([inputs["text"], negatives.flatten(0, 1)])
        return inputs

    def step_embeddings(self, out: Any) -> StepEmbeddings:
        """What the loss needs of the model's forward output (a ``ContrastiveOutput``), in float32; text rows
        beyond the batch are its hard negatives (``model_inputs``), returned as ``negatives["text"]``."""
        bias = out.logit_bias.float() if out.logit_bias is not None else None
        embeddings = {m: e.float() for m, e in out.embeddings.items()}
        negatives = {}
        batch = min(e.shape[0] for e in embeddings.values())
        if "text" in embeddings and embeddings["text"].shape[0] > batch:
            text = embeddings["text"]
            embeddings["text"] = text[:batch]
            negatives["text"] = text[batch:].reshape(batch, -1, text.shape[-1])  # (B, N, D)
        return StepEmbeddings(embeddings, out.logit_scale.float(), bias, negatives=negatives)

    def forward_step(self, forward: nn.Module, batch: Batch) -> StepEmbeddings:
        """One forward pass over ``batch`` as the loss sees it, with the batch's group ids."""
        step = self.step_embeddings(forward(**self.model_inputs(batch)))
        step.groups = self.group_ids(batch, step.logit_scale.device)
        return step

    def group_ids(self, batch: Batch, device: torch.device) -> torch.Tensor | None:
        """``(B,)`` ids equal where the samples' ``data.group_by`` values are (``None`` when unset). Ids are
        a stable hash of the value, so they agree across ranks and data workers without a shared table."""
        key = self.cfg.data.group_by
        if key is None:
            return None
        missing = [i for i, meta in enumerate(batch.meta) if key not in meta]
        if missing:
            have = sorted(batch.meta[missing[0]])
            raise ValueError(f"data.group_by={key!r}: a sample has no {key!r} (its fields are {have})")
        return torch.tensor([stable_id(meta[key]) for meta in batch.meta], dtype=torch.long, device=device)

    def contrastive_loss(self, step: StepEmbeddings) -> torch.Tensor:
        """The loss ``optim.loss`` names (CLIP or SigLIP) over the global batch, with the step's group ids and
        hard negatives."""
        o = self.cfg.optim
        extras = {"groups": step.groups, "negatives": {m: x.flatten(0, 1) for m, x in step.negatives.items()}}
        if o.loss == "siglip":
            return siglip_loss(step.embeddings, step.logit_scale, step.logit_bias, tile=o.loss_tile, **extras).loss
        return clip_loss(step.embeddings, step.logit_scale, local_loss=o.local_loss, tile=o.loss_tile, **extras).loss

    def loss_targets(self, batch: Batch) -> Any:
        """What the loss needs of ``batch`` besides the model's outputs (nothing here; a teacher's
        embeddings for distillation). Computed once per batch, under the run's precision."""
        return None

    def loss_from_embeddings(self, step: StepEmbeddings, targets: Any) -> torch.Tensor:
        """The loss of a whole (local) batch from its embeddings; GradCache calls it once per batch.

        Args:
            step: the embeddings of every sample of the batch.
            targets: what ``loss_targets`` gave for the batch.
        """
        return self.contrastive_loss(step)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_from_embeddings(self.forward_step(model, batch), self.loss_targets(batch))

    @staticmethod
    def modalities(batch: Batch) -> list[str]:
        return [m for m in ("audio", "image", "text") if m in batch.inputs]

    def accumulated_backward(self, trainer: Trainer, batch: Batch, chunks: int) -> torch.Tensor:
        """Gradient accumulation that keeps the loss over the whole batch (GradCache).

        1. embed every micro-batch without gradients (remembering the RNG state), and get the batch's
           ``loss_targets``;
        2. compute ``loss_from_embeddings`` over all of them at once, and its gradient w.r.t. every
           per-sample output and the shared temperature and bias;
        3. re-run each micro-batch with gradients from the same RNG state and backpropagate those
           output gradients, so parameters get exactly the full-batch gradient.
        """
        model, forward = trainer.model, trainer.forward_model
        micro = split_batch(batch, chunks)
        rng, cached, shared = [], [], None
        with torch.no_grad():
            for part in micro:
                rng.append(ForwardRngState(trainer.device))
                with _frozen_buffers(model), trainer.autocast():
                    step = self.forward_step(forward, part)
                cached.append(step.per_sample())
                shared = step.shared() if shared is None else shared  # the same parameters for every part
            with trainer.autocast():
                targets = self.loss_targets(batch)  # once for the whole batch, never per micro-batch
        full = {k: torch.cat([c[k] for c in cached]) for k in cached[0]}
        for value in full.values():
            value.requires_grad_(value.is_floating_point())  # group ids are integers
        shared = {k: v.detach().requires_grad_(True) for k, v in shared.items()}
        loss = self.loss_from_embeddings(StepEmbeddings.from_tensors(full, shared), targets)
        leaves = {k: v for k, v in full.items() if v.requires_grad} | {f"shared/{k}": v for k, v in shared.items()}
        # an output the loss does not read (the bias under the CLIP loss) gets no gradient
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        offset, n = 0, len(micro)
        for i, part in enumerate(micro):
            size = len(part)
            sync = i == n - 1 or not hasattr(forward, "no_sync")
            context = contextlib.nullcontext() if sync else forward.no_sync()
            rng[i].restore()
            with context:
                with trainer.autocast():
                    step = self.forward_step(forward, part)
                # a surrogate whose gradient w.r.t. the parameters is the full-batch gradient
                terms = [
                    (value * grads[k][offset : offset + size]).sum()
                    for k, value in step.per_sample().items()
                    if grads.get(k) is not None
                ]
                terms += [
                    value * grads[f"shared/{k}"] / n
                    for k, value in step.shared().items()
                    if grads[f"shared/{k}"] is not None
                ]
                trainer.backward(sum(terms))
            offset += size
        return loss.detach()

    def contrastive_model(self, model: nn.Module) -> nn.Module:
        """The ``ContrastiveModel`` in what trains (here the model itself): data, evaluation and the
        temperature's clamp use it."""
        return model

    def after_step(self, model: nn.Module) -> None:
        self.contrastive_model(model).alignment.clamp_()

    def log_values(self, model: nn.Module) -> dict[str, float]:
        return {"logit_scale": self.contrastive_model(model).alignment.scale().item()}

    def evaluate(self, model: nn.Module, data: RunData, device: torch.device) -> tuple[dict[str, float], dict]:
        return evaluate_heldout(self.contrastive_model(model), self.tokenizer, data, device)

    def write_outputs(
        self, run_dir: Path, report: dict[str, Any], rows: list[dict], extras: dict, data: RunData, model: nn.Module
    ) -> None:
        write_retrieval_grid(run_dir, extras, data, self.contrastive_model(model))

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """Zero-shot accuracy per attribute (and on unseen combinations), then retrieval recall and ranks."""
        return format_metrics(report.get("eval", {}))
