"""The distillation task (``task: distill``): a small student learns from a frozen contrastive teacher.

The student is ``model`` (as in the contrastive task: a registered name with ``overrides``, or a saved
model). Each step's loss is

    contrastive_weight * the student's own contrastive loss (``optim.loss``: CLIP or SigLIP)
    + kd_weight * KL(teacher || student) of the image-text similarity rows, both directions
      (``polymodal.fusion.affinity_distillation_loss``, softmax at ``kd_temperature``)
    + feature_weight * the distance between the student's embedding, projected into the teacher's
      space by a learned linear map, and the teacher's (``polymodal.fusion.feature_distillation_loss``)

over the global batch. The teacher embeds each batch once, without gradients; the student's losses go
through the contrastive task's GradCache, so ``optim.accum_steps`` gives the full batch's gradients. Under
DDP every rank holds its own copy of the teacher and the similarities span all ranks' samples (with
``optim.local_loss`` each rank scores only its own rows, as for the CLIP loss).

What trains and is checkpointed is a ``DistillationStudent``: the student plus the projection. A
checkpoint's ``model.safetensors`` and ``config.json`` are the plain student's (``polymodal.from_pretrained``
loads it, and a run directory resolves to it); the projection sits beside them for resuming.

``task_args``:
    teacher: the teacher, any reference the model resolver takes: a training run directory
        (``runs/demo``), a saved model, a Hugging Face CLIP or open_clip directory, or a registered name
        with ``teacher_pretrained`` weights. Required.
    teacher_pretrained: weights for a registered ``teacher`` (a directory or a state-dict file, e.g.
        open_clip's).
    contrastive_weight: weight of the student's own contrastive loss (default 1).
    kd_weight: weight of the similarity distillation (default 1).
    kd_temperature: softmax temperature of both models' cosine similarities in it (default 0.05).
    feature_weight: weight of the feature distillation (default 0: no projection is built).
    feature_loss: ``cosine`` (1 - cosine similarity, the default) or ``mse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from polymodal.checkpoint import WEIGHTS_NAME, CheckpointError, load_state_dict_strict, read_state_dict, save_state_dict
from polymodal.errors import ConfigError
from polymodal.fusion import affinity_distillation_loss, feature_distillation_loss
from polymodal.model import ContrastiveOutput

from .config import parse_section
from .data import RunData
from .task_contrastive import ContrastiveTask, StepEmbeddings
from .tasks import register_task
from .teacher import Teacher, check_teacher, load_teacher

PROJECTION_NAME = "distill_projection.safetensors"


@dataclass
class DistillOptions:
    """The ``task_args`` of ``task: distill`` (see the module docstring)."""

    teacher: str = ""
    teacher_pretrained: str | None = None
    contrastive_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 0.05
    feature_weight: float = 0.0
    feature_loss: Literal["cosine", "mse"] = "cosine"

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> DistillOptions:
        opts = parse_section(cls, args, "task_args")
        if not opts.teacher:
            raise ConfigError(
                "task distill needs task_args.teacher: the trained model to learn from (e.g. runs/demo, "
                "which 'make demo' writes)"
            )
        for name in ("contrastive_weight", "kd_weight", "feature_weight"):
            if getattr(opts, name) < 0:
                raise ConfigError(f"task_args.{name} must be >= 0, got {getattr(opts, name)}")
        if opts.kd_weight == 0 and opts.feature_weight == 0:
            raise ConfigError(
                "task_args.kd_weight and task_args.feature_weight are both 0, so nothing is distilled; "
                "set one of them (or train with task: contrastive)"
            )
        if not opts.kd_temperature > 0:
            raise ConfigError(f"task_args.kd_temperature must be > 0, got {opts.kd_temperature}")
        return opts


@dataclass
class DistillationOutput:
    """What ``DistillationStudent.forward`` returns.

    Attributes:
        student: the student's own output.
        projected: ``{modality: (B, teacher_dim)}``, the student's embeddings through the projection
            (empty without feature distillation).
    """

    student: ContrastiveOutput
    projected: dict[str, torch.Tensor]


class DistillationStudent(nn.Module):
    """The student and the learned projections of its embeddings into the teacher's space: what trains.

    The trainer optimises, wraps in DDP and checkpoints one module, and the projection must train and
    resume with the student; but what a run leaves must be the plain student. So ``write_pretrained_files``
    writes the student's own files plus ``PROJECTION_NAME`` (only when the projection has weights), and
    ``read_pretrained_files`` reads both back; ``save_pretrained`` saves the student alone. The teacher is
    not part of it: it is neither trained, nor checkpointed, nor wrapped in DDP.

    Args:
        student: a ``ContrastiveModel``.
        projection: per modality, a map from the student's embedding width to the teacher's (empty: none).
    """

    def __init__(self, student: nn.Module, projection: nn.ModuleDict) -> None:
        super().__init__()
        self.student = student
        self.projection = projection

    @property
    def towers(self) -> nn.ModuleDict:
        """The student's towers (the trainer asks which of them the data leaves unused, for DDP)."""
        return self.student.towers

    def forward(self, **inputs: torch.Tensor) -> DistillationOutput:
        out = self.student(**inputs)
        projected = {m: self.projection[m](e) for m, e in out.embeddings.items() if m in self.projection}
        return DistillationOutput(out, projected)

    def write_pretrained_files(self, directory: Path) -> None:
        self.student.write_pretrained_files(directory)
        state = self.projection.state_dict()
        if state:
            save_state_dict(state, directory / PROJECTION_NAME)

    def read_pretrained_files(self, directory: Path) -> None:
        """Load what ``write_pretrained_files`` wrote (strictly: every key must match)."""
        load_state_dict_strict(self.student, read_state_dict(directory / WEIGHTS_NAME), source=str(directory))
        if not self.projection.state_dict():
            return
        file = directory / PROJECTION_NAME
        if not file.is_file():
            raise CheckpointError(
                f"{str(directory)!r} has no {PROJECTION_NAME}, so it is not a checkpoint of a distillation run "
                "with feature distillation; resume from one, or start afresh"
            )
        load_state_dict_strict(self.projection, read_state_dict(file), source=str(file))

    def save_pretrained(self, directory, overwrite: bool = False) -> Path:
        """Save the plain student (``polymodal.from_pretrained`` loads it); the projection only serves training."""
        return self.student.save_pretrained(directory, overwrite=overwrite)


@register_task
class DistillTask(ContrastiveTask):
    """Distil a frozen teacher into the student ``model``; see the module docstring for ``task_args``."""

    name = "distill"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.data.hard_negatives:
            raise ValueError(
                "task distill does not take data.hard_negatives (the teacher would have to embed them too); "
                "set it to 0, or train them with task contrastive"
            )
        # a missing, untrained or non-contrastive teacher fails before anything is built or written
        self.reference, self.teacher_weights = check_teacher(self.opts.teacher, self.opts.teacher_pretrained)
        self.teacher: Teacher | None = None
        self.device = torch.device("cpu")
        self._parts: dict[str, torch.Tensor] = {}

    def parse_task_args(self, args: dict[str, Any]) -> None:
        self.opts = DistillOptions.from_args(args)

    def build_model(self, device: torch.device) -> nn.Module:
        student = super().build_model(device)
        self.device = device
        projection = nn.ModuleDict()
        if self.opts.feature_weight > 0:
            width, teacher_width = student.config.embed_dim, self.reference.config.embed_dim
            for m in student.towers:
                if m in self.reference.config.towers:
                    same = width == teacher_width
                    projection[m] = (
                        nn.Identity() if same else nn.Linear(width, teacher_width, bias=False, device=device)
                    )
        return DistillationStudent(student, projection)

    def contrastive_model(self, model: nn.Module) -> nn.Module:
        return model.student

    def adapted_model(self, model: nn.Module) -> nn.Module:
        return model.student

    def build_data(self, model: nn.Module) -> RunData:
        data = super().build_data(model)
        student = self.contrastive_model(model).config
        self.teacher = load_teacher(self.reference, self.teacher_weights, student, list(data.modalities), self.device)
        return data

    def step_embeddings(self, out: DistillationOutput) -> StepEmbeddings:
        step = super().step_embeddings(out.student)
        step.extra = {m: p.float() for m, p in out.projected.items()}
        return step

    def loss_targets(self, batch) -> dict[str, torch.Tensor]:
        """The teacher's embeddings of ``batch``."""
        return self.teacher.embed({m: batch.inputs[m] for m in self.modalities(batch)})

    def loss_from_embeddings(self, step: StepEmbeddings, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.opts
        # computed even at weight 0, so the temperature stays in the graph (DDP expects every gradient)
        contrastive = self.contrastive_loss(step)
        loss = o.contrastive_weight * contrastive
        parts = {"contrastive_loss": contrastive}
        if o.kd_weight > 0:
            kd = affinity_distillation_loss(
                step.embeddings, targets, o.kd_temperature, local_loss=self.cfg.optim.local_loss
            ).loss
            loss = loss + o.kd_weight * kd
            parts["kd_loss"] = kd
        if o.feature_weight > 0:
            teacher = {m: targets[m] for m in step.extra}
            feature = feature_distillation_loss(step.extra, teacher, o.feature_loss).loss
            loss = loss + o.feature_weight * feature
            parts["feature_loss"] = feature
        self._parts = {k: v.detach() for k, v in parts.items()}
        return loss

    def log_values(self, model: nn.Module) -> dict[str, float]:
        return {**super().log_values(model), **{k: float(v) for k, v in self._parts.items()}}

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        o = self.opts
        weights = f"contrastive {o.contrastive_weight:g}, kd {o.kd_weight:g} at T={o.kd_temperature:g}"
        if o.feature_weight:
            weights += f", feature ({o.feature_loss}) {o.feature_weight:g}"
        return [f"distilled from {o.teacher} ({weights})", *super().summary_lines(report)]
