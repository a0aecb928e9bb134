"""The contrastive task (``task: contrastive``, the default): CLIP / SigLIP pre-training of a ``ContrastiveModel``."""

from __future__ import annotations

import contextlib
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


@register_task
class ContrastiveTask(TrainTask):
    """Align the towers of ``cfg.model.name`` with the CLIP (``optim.loss: clip``) or sigmoid loss.

    Takes no ``task_args``. Evaluation: zero-shot accuracy per attribute of the built-in data and
    cross-modal retrieval recall on the held-out split.
    """

    name = "contrastive"
    output_names = ("retrieval_grid.png",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.task_args:
            raise ValueError(f"task contrastive takes no task_args, got {sorted(cfg.task_args)}")
        if not cfg.model.name:
            raise ValueError("task contrastive needs model.name (a registered model such as clip-vit-tiny)")
        self.tokenizer = None

    def build_model(self, device: torch.device) -> nn.Module:
        cfg = self.cfg.model
        model = resolve_model(cfg.name, pretrained=cfg.pretrained, device=device, **cfg.overrides)
        if not hasattr(model, "alignment"):
            raise ValueError(f"task contrastive needs a contrastive model; {cfg.name!r} is a {type(model).__name__}")
        for modality, unlocked in cfg.lock.items():
            model.lock_tower(modality, unlocked_layers=unlocked)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def build_data(self, model: nn.Module) -> RunData:
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

    def _loss_from(
        self, embeddings: dict[str, torch.Tensor], scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.cfg.optim.loss == "siglip":
            return siglip_loss(embeddings, scale, bias).loss
        return clip_loss(embeddings, scale, local_loss=self.cfg.optim.local_loss).loss

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(**{m: batch.inputs[m] for m in self.modalities(batch)})
        embeddings = {m: e.float() for m, e in out.embeddings.items()}
        return self._loss_from(embeddings, out.logit_scale.float(), out.logit_bias)

    @staticmethod
    def modalities(batch: Batch) -> list[str]:
        return [m for m in ("audio", "image", "text") if m in batch.inputs]

    def accumulated_backward(self, trainer: Trainer, batch: Batch, chunks: int) -> torch.Tensor:
        """Gradient accumulation that keeps the contrastive loss over the whole batch (GradCache).

        1. embed every micro-batch without gradients (remembering the RNG state);
        2. compute the loss over all embeddings at once and its gradient w.r.t. the embeddings,
           the temperature and the bias;
        3. re-run each micro-batch with gradients from the same RNG state and backpropagate those
           embedding gradients, so parameters get exactly the full-batch gradient.
        """
        model, forward = trainer.model, trainer.forward_model
        micro = [{m: part.inputs[m] for m in self.modalities(part)} for part in split_batch(batch, chunks)]
        rng, cached = [], []
        with torch.no_grad():
            for inputs in micro:
                rng.append(ForwardRngState(trainer.device))
                with _frozen_buffers(model), trainer.autocast():
                    cached.append({m: e.float() for m, e in forward(**inputs).embeddings.items()})
        full = {m: torch.cat([c[m] for c in cached]).requires_grad_(True) for m in cached[0]}
        scale = model.alignment.scale().detach().float().requires_grad_(True)
        bias = model.alignment.logit_bias
        bias = bias.detach().float().requires_grad_(True) if bias is not None else None
        loss = self._loss_from(full, scale, bias)
        leaves = [*full.values(), scale, *([bias] if bias is not None else [])]
        grads = torch.autograd.grad(loss, leaves)
        emb_grads = dict(zip(full, grads))
        scale_grad, bias_grad = grads[len(full)], (grads[-1] if bias is not None else None)
        offset, n = 0, len(micro)
        for i, inputs in enumerate(micro):
            size = cached[i][next(iter(cached[i]))].shape[0]
            sync = i == n - 1 or not hasattr(forward, "no_sync")
            context = contextlib.nullcontext() if sync else forward.no_sync()
            rng[i].restore()
            with context:
                with trainer.autocast():
                    out = forward(**inputs)
                # a surrogate whose gradient w.r.t. the parameters is the full-batch gradient
                surrogate = sum(
                    (out.embeddings[m].float() * emb_grads[m][offset : offset + size]).sum() for m in out.embeddings
                )
                surrogate = surrogate + out.logit_scale.float() * scale_grad / n
                if bias_grad is not None:
                    surrogate = surrogate + out.logit_bias.float() * bias_grad / n
                trainer.backward(surrogate)
            offset += size
        return loss.detach()

    def after_step(self, model: nn.Module) -> None:
        model.alignment.clamp_()

    def log_values(self, model: nn.Module) -> dict[str, float]:
        return {"logit_scale": model.alignment.scale().item()}

    def evaluate(self, model: nn.Module, data: RunData, device: torch.device) -> tuple[dict[str, float], dict]:
        return evaluate_heldout(model, self.tokenizer, data, device)

    def write_outputs(
        self, run_dir: Path, report: dict[str, Any], rows: list[dict], extras: dict, data: RunData, model: nn.Module
    ) -> None:
        write_retrieval_grid(run_dir, extras, data, model)

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """Zero-shot accuracy per attribute (and on unseen combinations), then retrieval recall and ranks."""
        return format_metrics(report.get("eval", {}))
