"""Checkpoint I/O: safe weight reading, strict loading with readable errors, atomic saving, and the
layout of a training run's checkpoints (which the resolver reads without importing the trainer)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from polymodal.encoders.weights import CheckpointError, load_state_dict_strict, read_state_dict
from polymodal.fileio import atomic_directory, atomic_file, atomic_write_text

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE",
    "CONFIG_NAME",
    "FORMAT_NAME",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "PretrainedMixin",
    "checkpoint_dir",
    "complete_checkpoints",
    "load_state_dict_strict",
    "newest_checkpoint",
    "read_state_dict",
    "save_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
FORMAT_NAME = "polymodal"

# A training run directory holds CHECKPOINTS_DIR/step_XXXXXXXX; the COMPLETE marker is written last,
# so a checkpoint without it is one a crash interrupted.
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Save tensors as safetensors atomically (readers never see half a file)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a training run keeps its checkpoint of ``step``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (directories without the marker are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def is_run_directory(path: str | os.PathLike) -> bool:
    """A training run directory: no model config of its own, a ``checkpoints/`` folder instead."""
    path = Path(path)
    return not (path / CONFIG_NAME).is_file() and (path / CHECKPOINTS_DIR).is_dir()


def newest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint of a training run directory."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"{str(run_dir)!r} is a training run without a complete checkpoint yet ({CHECKPOINTS_DIR}/ holds "
            "none with its completion marker); wait for the run to save one"
        )
    return found[-1]


class PretrainedMixin:
    """``save_pretrained`` for models that keep the ``ModelConfig`` they were built from."""

    config: Any
    # where the weights came from, in words, for the model card (the resolver and the trainer set it)
    weights_source: str | None = None

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a model card (``README.md``) to ``directory``
        atomically."""
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_pretrained_files(tmp)
        return Path(directory)

    def write_pretrained_files(self, directory: Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (of ``state``, default this model's) into a directory."""
        from polymodal import __version__

        if self.config is None:
            raise ValueError(
                f"this {type(self).__name__} was built without a ModelConfig; "
                "build it with create_model() or from_config() to save it"
            )
        data = {"format": FORMAT_NAME, "polymodal_version": __version__, **self.config.to_dict()}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=True)
        state = self.state_dict() if state is None else state
        save_state_dict(state, directory / WEIGHTS_NAME, metadata={"polymodal_version": __version__})
        from .model_card import CARD_NAME, model_card  # the card reads the config tables, which import this module

        atomic_write_text(directory / CARD_NAME, model_card(self), overwrite=True)
