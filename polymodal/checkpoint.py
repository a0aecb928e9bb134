"""Checkpoint I/O: safe weight reading, strict loading with readable errors, atomic saving."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from polymodal.encoders.weights import CheckpointError, atomic_directory, load_state_dict_strict, read_state_dict

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "PretrainedMixin",
    "atomic_directory",
    "atomic_write_bytes",
    "load_state_dict_strict",
    "read_state_dict",
    "save_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
FORMAT_NAME = "polymodal"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary name and a rename, so readers never see half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors atomically (a temporary file renamed into place)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class PretrainedMixin:
    """``save_pretrained`` for models that keep the ``ModelConfig`` they were built from."""

    config: Any

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` atomically."""
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
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        state = self.state_dict() if state is None else state
        save_state_dict(state, directory / WEIGHTS_NAME, metadata={"polymodal_version": __version__})
