"""Training checkpoints: weights as safetensors plus a training-state file, written atomically.

A checkpoint is a directory ``run_dir/checkpoints/step_XXXXXXXX`` (its layout and the marker are defined
in ``polymodal.checkpoint``, which the model resolver reads without the trainer) holding ``config.json`` and
``model.safetensors`` (loadable with ``polymodal.from_pretrained``), ``ema.safetensors`` when an EMA is
kept, ``training_state.pt`` (optimizer, scheduler, scaler, RNG states, data position, counters) and,
written last, a ``COMPLETE`` marker. The directory is assembled under a temporary name and renamed
into place, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polymodal.checkpoint import (
    COMPLETE,
    WEIGHTS_NAME,
    checkpoint_dir,
    complete_checkpoints,
    load_state_dict_strict,
    read_state_dict,
    save_state_dict,
)
from polymodal.fileio import atomic_directory, atomic_write_text

__all__ = [
    "COMPLETE",
    "EMA_NAME",
    "STATE_NAME",
    "checkpoint_dir",
    "complete_checkpoints",
    "load_model_files",
    "load_training_state",
    "resolve_resume",
    "rng_state",
    "save_training_checkpoint",
    "set_rng_state",
]

STATE_NAME = "training_state.pt"
EMA_NAME = "ema.safetensors"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches, in a form ``torch.load(weights_only=True)`` reads back."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune all but the ``keep`` newest complete ones."""
    destination = checkpoint_dir(run_dir, step)
    with atomic_directory(destination, overwrite=True) as tmp:
        model.write_pretrained_files(tmp)
        if ema_state is not None:
            save_state_dict(ema_state, tmp / EMA_NAME)
        torch.save(training_state, tmp / STATE_NAME)
        atomic_write_text(tmp / COMPLETE, f"{step}\n")
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return destination


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``"latest"`` → newest complete checkpoint (``None`` when there is none yet); a path → that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a complete training checkpoint (no {COMPLETE} marker)")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)


def load_model_files(model: nn.Module, path: Path) -> None:
    """Load into ``model`` what its ``write_pretrained_files`` wrote into checkpoint ``path``, strictly.

    A model that writes more than its own weights (the distillation task's student with its projection)
    reads them back with its ``read_pretrained_files``; any other model loads ``model.safetensors``.
    """
    reader = getattr(model, "read_pretrained_files", None)
    if reader is not None:
        reader(path)
    else:
        load_state_dict_strict(model, read_state_dict(path / WEIGHTS_NAME), source=str(path))
