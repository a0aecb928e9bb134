"""The contrastive task (``task: contrastive``, the default): CLIP / SigLIP pre-training of a ``ContrastiveModel``."""

from __future__ import annotations

import contextlib
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
from .tasks import ForwardRngState, TrainTask, register_task, split_batch

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


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
    """

    embeddings: dict[str, torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def per_sample(self) -> dict[str, torch.Tensor]:
        """Every tensor with a row per sample, keyed ``embeddings/<modality>`` and ``extra/<name>``."""
        rows = {f"embeddings/{m}": e for m, e in self.embeddings.items()}
        return rows | {f"extra/{k}": v for k, v in self.extra.items()}

    def shared(self) -> dict[str, torch.Tensor]:
        """The scalars every sample shares: ``logit_scale`` and, when there is one, ``logit_bias``."""
        bias = {} if self.logit_bias is None else {"logit_bias": self.logit_bias}
        return {"logit_scale": self.logit_scale, **bias}

    @classmethod
    def from_tensors(cls, per_sample: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> StepEmbeddings:
        """The inverse of ``per_sample`` and ``shared``."""
        groups: dict[str, dict[str, torch.Tensor]] = {"embeddings": {}, "extra": {}}
        for key, value in per_sample.items():
            group, name = key.split("/", 1)
            groups[group][name] = value
        return cls(groups["embeddings"], shared["logit_scale"], shared.get("logit_bias"), groups["extra"])


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
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

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

    def step_embeddings(self, out: Any) -> StepEmbeddings:
        """What the loss needs of the model's forward output (a ``ContrastiveOutput``), in float32."""
        bias = out.logit_bias.float() if out.logit_bias is not None else None
        return StepEmbeddings({m: e.float() for m, e in out.embeddings.items()}, out.logit_scale.float(), bias)

    def contrastive_loss(self, step: StepEmbeddings) -> torch.Tensor:
        """The loss ``optim.loss`` names (CLIP or SigLIP) over the global batch."""
        if self.cfg.optim.loss == "siglip":
            return siglip_loss(step.embeddings, step.logit_scale, step.logit_bias).loss
        return clip_loss(step.embeddings, step.logit_scale, local_loss=self.cfg.optim.local_loss).loss

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
        out = model(**{m: batch.inputs[m] for m in self.modalities(batch)})
        return self.loss_from_embeddings(self.step_embeddings(out), self.loss_targets(batch))

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
        micro = [{m: part.inputs[m] for m in self.modalities(part)} for part in split_batch(batch, chunks)]
        rng, cached, shared = [], [], None
        with torch.no_grad():
            for inputs in micro:
                rng.append(ForwardRngState(trainer.device))
                with _frozen_buffers(model), trainer.autocast():
                    step = self.step_embeddings(forward(**inputs))
                cached.append(step.per_sample())
                shared = step.shared() if shared is None else shared  # the same parameters for every part
            with trainer.autocast():
                targets = self.loss_targets(batch)  # once for the whole batch, never per micro-batch
        full = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in cached[0]}
        shared = {k: v.detach().requires_grad_(True) for k, v in shared.items()}
        loss = self.loss_from_embeddings(StepEmbeddings.from_tensors(full, shared), targets)
        leaves = {**full, **{f"shared/{k}": v for k, v in shared.items()}}
        # an output the loss does not read (the bias under the CLIP loss) gets no gradient
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        offset, n = 0, len(micro)
        for i, inputs in enumerate(micro):
            size = next(iter(cached[i].values())).shape[0]
            sync = i == n - 1 or not hasattr(forward, "no_sync")
            context = contextlib.nullcontext() if sync else forward.no_sync()
            rng[i].restore()
            with context:
                with trainer.autocast():
                    step = self.step_embeddings(forward(**inputs))
                # a surrogate whose gradient w.r.t. the parameters is the full-batch gradient
                terms = [
                    (value * grads[k][offset : offset + size]).sum()
                    for k, value in step.per_sample().items()
                    if grads[k] is not None
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
