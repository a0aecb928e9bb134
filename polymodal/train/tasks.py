"""What the trainer trains: a task builds the model and data, computes the loss, evaluates and reports.

The ``Trainer`` owns everything a task does not care about (devices and DDP, the optimiser and
schedule, mixed precision, gradient clipping, the non-finite guard, checkpoints and exact resume,
logging). A task owns what differs between contrastive pre-training, classification, captioning
and distillation. ``TrainConfig.task`` names the task and ``TrainConfig.task_args`` holds its
options, which the task validates.

Adding a task: subclass ``TrainTask``, set ``name``, decorate with ``@register_task``, and import its
module in ``_import_builtin_tasks`` (or anywhere before ``get_task`` is called).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from polymodal.datasets import Batch

from .config import ModelSection, TrainConfig
from .data import RunData

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer

TASKS: dict[str, type[TrainTask]] = {}
# Modules of the tasks that ship with polymodal; imported lazily (each may pull in heavy task code).
_BUILTIN_TASK_MODULES = ("task_contrastive", "task_classify", "task_caption", "task_distill")


class TrainTask:
    """Base class of trainer tasks; see the module docstring.

    Args:
        cfg: the whole run's config; ``cfg.task_args`` holds this task's options.
    """

    name: ClassVar[str] = ""
    # Files a fresh run with ``overwrite=true`` may delete from ``run_dir`` besides the trainer's own.
    output_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def build_model(self, device: torch.device) -> nn.Module:
        """The model whose parameters are trained and checkpointed.

        It must offer ``write_pretrained_files(directory)``, and ``read_pretrained_files(directory)`` when
        it writes more than its own ``model.safetensors`` (see ``checkpoints.load_model_files``).
        """
        raise NotImplementedError

    def adapted_model(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` that ``model.lora`` adds adapters to (the model itself, unless it wraps one)."""
        return model

    def build_data(self, model: nn.Module) -> RunData:
        """Training and held-out datasets; batches reach ``loss`` as ``polymodal.datasets.Batch``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar loss of a (micro-)batch; runs under autocast. ``model`` may be wrapped in DDP."""
        raise NotImplementedError

    def accumulated_backward(self, trainer: Trainer, batch: Batch, chunks: int) -> torch.Tensor:
        """Backpropagate ``batch`` in ``chunks`` micro-batches; return the loss of the whole batch.

        The default suits losses that are means over samples: each micro-batch's loss is weighted
        by its share of the batch, so the summed gradients equal the full batch's. Losses that
        couple samples (contrastive) override this.
        """
        parts = split_batch(batch, chunks)
        total = torch.zeros((), device=trainer.device)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            context = contextlib.nullcontext() if last else _no_sync(trainer.forward_model)
            with context:
                with trainer.autocast():
                    loss = self.loss(trainer.forward_model, part) * (len(part) / len(batch))
                trainer.backward(loss)
            total = total + loss.detach().float()
        return total

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        """Learning-rate multipliers of ``optim.lr`` by parameter-name prefix (e.g. ``{"towers.": 0.1}``)."""
        return {}

    def after_step(self, model: nn.Module) -> None:
        """Called after every applied optimiser step (e.g. to clamp a temperature)."""

    def log_values(self, model: nn.Module) -> dict[str, float]:
        """Extra scalars for each metrics row."""
        return {}

    def evaluate(self, model: nn.Module, data: RunData, device: torch.device) -> tuple[dict[str, float], dict]:
        """Held-out metrics, and extras (embeddings, predictions) for ``write_outputs``."""
        return {}, {}

    def write_outputs(
        self, run_dir: Path, report: dict[str, Any], rows: list[dict], extras: dict, data: RunData, model: nn.Module
    ) -> None:
        """Plots and files beyond ``report.json`` (which the trainer writes)."""

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        """Lines the CLI prints after the run, below the throughput line."""
        return [f"{key}: {value:.4f}" for key, value in sorted(report.get("eval", {}).items())]


def finish_model(model: nn.Module, section: ModelSection) -> nn.Module:
    """What every task does last to the model it built (after its towers are locked): ``model.lora``'s adapters,
    then ``model.grad_checkpointing``."""
    if section.lora is not None:
        from polymodal.lora import add_lora

        add_lora(model, section.lora)
    if section.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def register_task(cls: type[TrainTask]) -> type[TrainTask]:
    """Class decorator adding a task to ``TASKS`` under ``cls.name``; names must be unique."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"a trainer task named {cls.name!r} is already registered ({TASKS[cls.name].__name__})")
    TASKS[cls.name] = cls
    return cls


def _import_builtin_tasks() -> None:
    for module in _BUILTIN_TASK_MODULES:
        name = f"{__package__}.{module}"
        # Only skip a task module that is absent; an import error inside one must surface.
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def get_task(name: str) -> type[TrainTask]:
    """The task class registered as ``name``."""
    _import_builtin_tasks()
    if name not in TASKS:
        raise ValueError(f"unknown trainer task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


class ForwardRngState:
    """The states of the generators a forward pass on ``device`` draws from (dropout, patch dropout).

    Recomputing a forward pass (GradCache, activation checkpointing by hand) must draw the same
    random numbers as the first pass. On an accelerator those come from the device's own generator,
    not the CPU's, so both are captured; ``restore`` puts both back.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.accelerator = None
        if self.device.type != "cpu":
            self.accelerator = torch.get_device_module(self.device.type).get_rng_state(self.device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(self.device.type).set_rng_state(self.accelerator, self.device)


def split_batch(batch: Batch, chunks: int) -> list[Batch]:
    """``batch`` cut into at most ``chunks`` consecutive micro-batches (tensors and meta alike)."""
    size = -(-len(batch) // chunks)  # ceil
    parts = []
    for start in range(0, len(batch), size):
        inputs = {k: v[start : start + size] for k, v in batch.inputs.items()}
        parts.append(Batch(inputs, batch.meta[start : start + size], {}, min(size, len(batch) - start)))
    return parts


def _no_sync(model: nn.Module):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
