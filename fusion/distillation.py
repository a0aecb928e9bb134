"""Distillation losses between a student's embeddings and a frozen teacher's (CLIP-KD, TinyCLIP).

``affinity_distillation_loss`` (affinity mimicking): for each pair of modalities ``a < b``, each row of
the similarity matrix ``a @ b.T`` (how one ``a`` sample relates to every ``b`` of the batch) and each row
of ``b @ a.T`` become distributions by a softmax at ``temperature``; the student's are pulled to the
teacher's by ``KL(teacher || student)``, averaged over rows and over the two directions. The teacher's and
the student's embedding widths may differ: only their similarities are compared.

Like the contrastive losses it couples the samples of a batch, and distributed runs arrange it the same
way (see ``polymodal.fusion.losses``): both models' features are gathered with ``all_gather_with_grad``;
without ``local_loss`` every rank computes the whole global matrices, so its loss *is* the global loss;
with ``local_loss`` rank r takes only its own B rows (both directions) against all N columns, and the
mean of the ranks' losses is the global loss. Either way DDP's averaged gradients are the single-process
gradients on the global batch.

``feature_distillation_loss`` compares each sample's student embedding (projected into the teacher's
space) with the teacher's; it is a mean over samples, so it needs no gather.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import gather_features, resolve_gather
from .inputs import check_batch_sizes, check_feature, check_modalities, check_paired_features

FEATURE_LOSSES = ("cosine", "mse")


@dataclass
class DistillationLossOutput:
    """A distillation loss and its parts.

    Attributes:
        loss: scalar total, the mean of ``parts``.
        parts: scalar loss per modality pair (``"image-text"``, affinity) or per modality (features).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher row) || softmax(student row))``."""
    log_student = F.log_softmax(student_logits, dim=-1)
    log_teacher = F.log_softmax(teacher_logits, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") / student_logits.shape[0]


def affinity_distillation_loss(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    temperature: float = 1.0,
    *,
    local_loss: bool = False,
    gather: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> DistillationLossOutput:
    """KL divergence between the teacher's and the student's similarity distributions, both directions.

    Args:
        student: ``{modality: (B, D_s)}``, L2-normalised, at least two modalities.
        teacher: ``{modality: (B, D_t)}`` for the same modalities and samples, L2-normalised; no gradient
            flows into it.
        temperature: softmax temperature of both models' cosine similarities (logits are ``cos / temperature``).
        local_loss: in distributed runs, score only this rank's rows against the global batch (see the
            module doc); the same gradients for less compute.
        gather: gather features from all ranks; ``None`` does so when torch.distributed runs with more
            than one rank.
        group: process group for the gather.
    """
    name = "affinity_distillation_loss"
    modalities = check_paired_features(student, name)
    check_modalities(teacher, modalities, name=name, what="teacher features")
    check_paired_features(teacher, name)
    check_batch_sizes({"student": student[modalities[0]], "teacher": teacher[modalities[0]]}, name=name)
    if not temperature > 0:
        raise ValueError(f"{name} needs a positive temperature, got {temperature}")
    do_gather = resolve_gather(gather, group, name)
    local = {"student": dict(student), "teacher": {m: teacher[m].detach() for m in modalities}}
    glob = {k: gather_features(v, group) if do_gather else v for k, v in local.items()}  # {m: (N, D)}

    parts = {}
    for a, b in itertools.combinations(modalities, 2):
        kl = []
        for model in ("student", "teacher"):
            if local_loss:
                ab = local[model][a] @ glob[model][b].T / temperature  # (B, N)
                ba = local[model][b] @ glob[model][a].T / temperature  # (B, N)
            else:
                ab = glob[model][a] @ glob[model][b].T / temperature  # (N, N)
                ba = ab.T
            kl.append((ab, ba))
        (student_ab, student_ba), (teacher_ab, teacher_ba) = kl
        parts[f"{a}-{b}"] = (_row_kl(student_ab, teacher_ab) + _row_kl(student_ba, teacher_ba)) / 2
    return DistillationLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)


def feature_distillation_loss(
    student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], kind: str = "cosine"
) -> DistillationLossOutput:
    """Per-sample distance between the student's embeddings, in the teacher's space, and the teacher's.

    Args:
        student: ``{modality: (B, D_t)}``, the student's embeddings after a projection into the
            teacher's width.
        teacher: ``{modality: (B, D_t)}``, the teacher's L2-normalised embeddings; no gradient flows into it.
        kind: ``"cosine"`` (mean of ``1 - cos``) or ``"mse"`` (mean squared error over every element).
    """
    name = "feature_distillation_loss"
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"{name}: kind must be one of {FEATURE_LOSSES}, got {kind!r}")
    if not isinstance(student, Mapping) or not student:
        raise ValueError(f"{name} expects a non-empty dict of (B, D) features keyed by modality, got {student!r}")
    check_modalities(teacher, student, name=name, what="teacher features")
    parts = {}
    for m in sorted(student):
        t = teacher[m].detach()
        check_feature(t, name=name, modality=m, ndims=(2,), expected="(B, D)")
        check_feature(student[m], name=name, modality=m, ndims=(2,), expected=f"(B, {t.shape[1]})", dim=t.shape[1])
        check_batch_sizes({"student": student[m], "teacher": t}, name=name)
        if kind == "cosine":
            parts[m] = (1 - F.cosine_similarity(student[m], t, dim=-1)).mean()
        else:
            parts[m] = F.mse_loss(student[m], t)
    return DistillationLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)
