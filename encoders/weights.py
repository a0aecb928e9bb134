"""Reading weight files safely and loading them strictly, with errors that name every problem.

Shared by the encoders (local timm / torchvision weights) and the core's checkpoint I/O.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from polymodal.errors import InputError

_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
_MAX_LISTED = 20


class CheckpointError(InputError):
    """A weights file that cannot be read, or whose contents do not fit the model."""


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``.pt``/``.pth``/``.bin``), on CPU.

    A wrapping dict (``{"state_dict": ...}``) is unwrapped and DDP ``module.`` prefixes stripped.
    Torch files are read with ``weights_only=True``, so they can hold tensors and plain containers only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file {str(path)!r} is empty (0 bytes)")
    kind = "safetensors" if path.suffix == ".safetensors" else _sniff(path)
    if kind == "safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    elif kind == "torch":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for corrupt or unsafe pickles
            raise CheckpointError(
                f"{str(path)!r} could not be read as a torch checkpoint with weights_only=True "
                f"(truncated, corrupt, or holding objects other than tensors): {e}"
            ) from e
    else:
        raise CheckpointError(f"{str(path)!r} is neither a safetensors file nor a torch zip checkpoint")
    return _unwrap(state, path)


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _STATE_DICT_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{str(path)!r} holds no tensors (top-level keys: {sorted(map(str, state))[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``, raising a ``CheckpointError`` that lists every mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_weights_file(module: nn.Module, path: str | os.PathLike, ignore_prefixes: Iterable[str] = ()) -> None:
    """Read a local weights file and load it into ``module`` strictly, dropping keys with ``ignore_prefixes``."""
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in read_state_dict(path).items() if not (prefixes and k.startswith(prefixes))}
    load_state_dict_strict(module, state, source=repr(str(path)))
