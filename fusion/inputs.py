"""Validation of the ``dict[str, Tensor]`` inputs every fusion module and loss takes.

Each check raises a ``ValueError`` that names the module, the modalities and the expected
shape, so a wrongly wired model fails at the first call with a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def check_modalities(features: Any, expected: Iterable[str], *, name: str, what: str = "features") -> None:
    """Require ``features`` to be a mapping with exactly the ``expected`` keys.

    Args:
        features: the caller's input.
        expected: modality names the module was built for.
        name: the module's name, for the message.
        what: what the mapping holds, for the message (``"features"``, ``"masks"``).
    """
    want = set(expected)
    if not isinstance(features, Mapping):
        raise ValueError(
            f"{name} expects a dict of {what} keyed by modality {sorted(want)}, got {type(features).__name__}"
        )
    got = set(features)
    if got != want:
        problems = []
        if want - got:
            problems.append(f"missing {sorted(want - got)}")
        if got - want:
            problems.append(f"unexpected {sorted(got - want)}")
        raise ValueError(f"{name} expects {what} for modalities {sorted(want)}; {', '.join(problems)}")


def check_feature(
    x: Any, *, name: str, modality: str, ndims: tuple[int, ...], expected: str, dim: int | None = None
) -> None:
    """Require one modality's tensor to have an allowed rank, a floating dtype and width ``dim``.

    Args:
        x: the tensor given for ``modality``.
        name: the module's name, for the message.
        modality: the key it was given under.
        ndims: allowed ranks, e.g. ``(2,)`` for pooled embeddings or ``(2, 3)`` for pooled or tokens.
        expected: a human-readable shape such as ``"(B, 512)"``.
        dim: required size of the last dimension, ``None`` for any.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a tensor of shape {expected} for {modality!r}, got {type(x).__name__}")
    if x.ndim not in ndims or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"{name} expects shape {expected} for {modality!r}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point tensor for {modality!r}, got dtype {x.dtype}")


def check_batch_sizes(tensors: Mapping[str, torch.Tensor], *, name: str) -> int:
    """Require every tensor to share the batch dimension and return it."""
    sizes = {key: int(tensors[key].shape[0]) for key in sorted(tensors)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{name} expects the same batch size for every modality, got {sizes}")
    return next(iter(sizes.values()))


def check_paired_features(features: Any, name: str) -> tuple[str, ...]:
    """Require ``{modality: (B, D)}`` features of at least two modalities, one batch size and one width.

    Returns:
        the modalities in sorted order, the order every loss pairs them in.
    """
    if not isinstance(features, Mapping):
        raise ValueError(f"{name} expects a dict of (B, D) features keyed by modality, got {type(features).__name__}")
    modalities = tuple(sorted(features))
    if len(modalities) < 2:
        raise ValueError(f"{name} needs features of at least 2 modalities, got {list(modalities)}")
    for m in modalities:
        check_feature(features[m], name=name, modality=m, ndims=(2,), expected="(B, D)")
    check_batch_sizes(features, name=name)
    dims = {m: int(features[m].shape[1]) for m in modalities}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{name} expects every modality in the same embedding width D, got {dims}")
    return modalities
