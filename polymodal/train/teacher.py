"""The frozen teacher of a distillation run: resolved like any model, checked against the student, and fed
the student's batches adapted to its own input spec.

A batch is built with the student's preprocessing and tokenizer. Where the teacher's input spec
(``ModelConfig.input_spec``) differs, the inputs are adapted only where the adaptation is exact up to
resampling, and refused otherwise, naming the difference:

- images: the student's normalisation is undone, the pixels resized to the teacher's size with the
  teacher's interpolation (the same aspect ratio only: anything else would distort or crop), clamped to
  [0, 1] as a decoded image is, and normalised with the teacher's mean and std;
- text: with the same tokenizer (type and vocabulary files), rows are padded to the teacher's context
  length, or cut to it with the end-of-text token kept last, as the tokenizer itself truncates. A caption
  that the student's shorter context already cut reaches the teacher cut the same way;
- audio: the sample rate and clip length must agree (resampling is not done here).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import InputSpec, ModelConfig
from polymodal.errors import InputError
from polymodal.factory import get_tokenizer
from polymodal.resolver import ModelReference, build_reference, parse_reference

__all__ = ["ImageAdapter", "Teacher", "TextAdapter", "check_teacher", "load_teacher"]


class ImageAdapter(nn.Module):
    """Images normalised for ``student`` (an ``InputSpec``) re-sized and re-normalised for ``teacher``.

    Args:
        student: the student's image spec (what the batch holds).
        teacher: the teacher's image spec.
        where: names the teacher in errors.
    """

    def __init__(self, student: InputSpec, teacher: InputSpec, where: str = "the teacher") -> None:
        super().__init__()
        if None not in (student.channels, teacher.channels) and student.channels != teacher.channels:
            raise InputError(f"{where} takes {teacher.channels}-channel images, the student {student.channels}")
        if None in (student.image_size, teacher.image_size):
            raise InputError(f"{where} or the student does not state its image size (preprocess.image_size)")
        (sh, sw), (th, tw) = student.image_size, teacher.image_size
        if sh * tw != sw * th:
            raise InputError(
                f"{where} takes {th}x{tw} images and the student {sh}x{sw}: another aspect ratio, which "
                "resizing would distort; give the student the teacher's aspect ratio"
            )
        self.size = teacher.image_size
        self.resize = student.image_size != teacher.image_size
        self.renormalise = self.resize or (student.mean, student.std) != (teacher.mean, teacher.std)
        self.interpolation = teacher.interpolation
        for name, values in (("student_mean", student.mean), ("student_std", student.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
        for name, values in (("teacher_mean", teacher.mean), ("teacher_std", teacher.std)):
            self.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.renormalise:
            return images
        pixels = images.float() * self.student_std + self.student_mean  # (B, C, H, W) in [0, 1]
        if self.resize:
            smooth = self.interpolation in ("bilinear", "bicubic")
            pixels = F.interpolate(
                pixels,
                size=self.size,
                mode=self.interpolation,
                antialias=smooth,
                **({"align_corners": False} if smooth else {}),
            ).clamp(0, 1)  # bicubic overshoots; a decoded image never leaves [0, 1]
        return ((pixels - self.teacher_mean) / self.teacher_std).to(images.dtype)


class TextAdapter:
    """Token ids of the student's context length padded or cut to the teacher's (one tokenizer for both).

    Args:
        student_length: the student's context length (what the batch holds).
        teacher_length: the teacher's context length.
        pad_token_id: the tokenizer's padding id.
        eot_token_id: its end-of-text id, kept last when a row is cut; ``None`` when it has none.
    """

    def __init__(self, student_length: int, teacher_length: int, pad_token_id: int, eot_token_id: int | None) -> None:
        self.student_length, self.teacher_length = student_length, teacher_length
        self.pad_token_id, self.eot_token_id = pad_token_id, eot_token_id

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        if length == self.teacher_length:
            return ids
        if length < self.teacher_length:
            pad = ids.new_full((batch, self.teacher_length - length), self.pad_token_id)
            return torch.cat([ids, pad], dim=1)  # (B, teacher_length)
        positions = torch.arange(length, device=ids.device)
        used = torch.where(ids != self.pad_token_id, positions + 1, 0).amax(dim=1)  # (B,) tokens up to the last
        cut = ids[:, : self.teacher_length].clone()  # (B, teacher_length)
        longer = used > self.teacher_length
        if bool(longer.any()):
            if self.eot_token_id is None:
                raise InputError(
                    f"a caption has {int(used.max())} tokens, more than the teacher's context length "
                    f"{self.teacher_length}, and the tokenizer has no end-of-text token to end a cut row with"
                )
            cut[longer, -1] = self.eot_token_id
        return cut


def _tokenizer_of(config: ModelConfig) -> tuple[str, str | None]:
    return (config.tokenizer.type, config.tokenizer.path) if config.tokenizer is not None else ("none", None)


def input_adapters(student: ModelConfig, teacher: ModelConfig, modalities: list[str], where: str) -> dict:
    """An adapter per modality from the student's inputs to the teacher's; ``InputError`` naming any
    difference that cannot be adapted exactly (see the module docstring)."""
    adapters = {}
    for m in modalities:
        s, t = student.input_spec(m), teacher.input_spec(m)
        if m == "image":
            adapter = ImageAdapter(s, t, where)
            adapters[m] = adapter if adapter.renormalise else None
        elif m == "audio":
            if (s.sample_rate, s.clip_seconds) != (t.sample_rate, t.clip_seconds):
                raise InputError(
                    f"{where} takes {t.clip_seconds} s of audio at {t.sample_rate} Hz, the student "
                    f"{s.clip_seconds} s at {s.sample_rate} Hz; audio is not resampled for a teacher"
                )
            adapters[m] = None
        elif m == "text":
            if _tokenizer_of(student) != _tokenizer_of(teacher):
                raise InputError(
                    f"{where} uses the tokenizer {_tokenizer_of(teacher)} and the student {_tokenizer_of(student)}; "
                    "token ids translate only between identical tokenizers (type and vocabulary)"
                )
            if s.context_length == t.context_length:
                adapters[m] = None
                continue
            tokenizer = get_tokenizer(teacher)
            eot = getattr(tokenizer, "eot_token_id", None)
            adapters[m] = TextAdapter(s.context_length, t.context_length, tokenizer.pad_token_id, eot)
    return adapters


def check_teacher(reference: str, pretrained: str | None) -> tuple[ModelReference, Path | str]:
    """What ``task_args.teacher`` names (its config, not yet its weights), a contrastive model with weights,
    and where those weights are (for ``load_teacher``).

    Raises:
        InputError: an unknown or unreadable reference, a model that is not contrastive, or a registered
            name without ``teacher_pretrained`` (a teacher with random weights teaches nothing).
    """
    try:
        parsed = parse_reference(reference)
    except (InputError, FileNotFoundError) as err:
        raise InputError(f"task_args.teacher: {err}") from None
    if parsed.config.kind != "contrastive":
        raise InputError(
            f"task_args.teacher {reference!r} is a {parsed.config.kind} model; a teacher must be a contrastive "
            "model (kind contrastive), whose image-text similarities the student learns to mimic"
        )
    weights = parsed.check_weights(
        pretrained, name=f"task_args.teacher {reference!r}", option="task_args.teacher_pretrained"
    )
    return parsed, weights


class Teacher:
    """A frozen contrastive model that embeds the student's batches (adapted to its inputs) without gradients.

    Args:
        model: the teacher, in eval mode with every parameter frozen.
        adapters: per modality, a callable from the student's inputs to the teacher's (``None``: as they are).
    """

    def __init__(self, model: nn.Module, adapters: dict) -> None:
        self.model, self.adapters = model, adapters

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{modality: (B, D_teacher)}`` L2-normalised float32 embeddings of the student's inputs."""
        out = {}
        for m, x in sorted(inputs.items()):
            adapter = self.adapters[m]
            out[m] = self.model.encode(m, adapter(x) if adapter is not None else x, normalize=True).float()
        return out


def load_teacher(
    reference: ModelReference, weights: Path | str, student: ModelConfig, modalities: list[str], device
) -> Teacher:
    """The teacher ``reference`` names, with the ``weights`` ``check_teacher`` found, checked to have a tower
    for every modality the student is trained on and to take (after adaptation) the student's inputs."""
    where = f"the teacher {reference.source!r}"
    missing = [m for m in modalities if m not in reference.config.towers]
    if missing:
        raise InputError(
            f"{where} has towers {sorted(reference.config.towers)}, but the student is trained on "
            f"{sorted(modalities)}: it lacks {missing}; a teacher needs a tower for each modality of the data"
        )
    adapters = input_adapters(student, reference.config, sorted(modalities), where)
    model = build_reference(reference, weights, device=device)
    model.eval().requires_grad_(False)
    for adapter in adapters.values():
        if isinstance(adapter, nn.Module):
            adapter.to(device)
    return Teacher(model, adapters)
