"""Small layers and checks shared by the image, text and audio encoders: activations and norms by
name, size pairs, and input validation. Attention and the transformer blocks live in ``attention``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by the original OpenAI CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def to_pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is checked and returned as a tuple (height, width)."""
    if isinstance(x, int):
        return (x, x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair (height, width), got {x!r}")
    return (int(x[0]), int(x[1]))


def get_act_layer(act_layer: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Resolve an activation given by name (as stored in configs) or as a module class."""
    if callable(act_layer):
        return act_layer
    if act_layer not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {act_layer!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act_layer]


def get_norm_layer(norm_layer: str | Callable[..., nn.Module], eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """Resolve a normalisation layer given by name or class into ``factory(dim) -> module``."""
    if callable(norm_layer):
        return norm_layer
    if norm_layer == "layernorm":
        return lambda dim: nn.LayerNorm(dim, eps=eps)
    if norm_layer == "rmsnorm":
        return lambda dim: nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm layer {norm_layer!r}; expected 'layernorm' or 'rmsnorm'")


def check_input(
    x: torch.Tensor,
    *,
    name: str,
    ndim: int,
    expected: str,
    dim_sizes: dict[int, int] | None = None,
    floating: bool = True,
) -> None:
    """Raise a ``ValueError`` that names the expected shape when ``x`` does not fit an encoder.

    Args:
        x: the input to check.
        name: the encoder's name, for the message.
        ndim: the rank the encoder expects.
        expected: a human-readable shape such as ``"(B, 3, H, W)"``.
        dim_sizes: required sizes of given dimensions, e.g. ``{1: 3}`` for three channels.
        floating: whether the input must be a floating-point tensor (else an integer tensor).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a tensor of shape {expected}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} expects a {ndim}-D tensor of shape {expected}, got shape {tuple(x.shape)}")
    for dim, size in (dim_sizes or {}).items():
        if x.shape[dim] != size:
            raise ValueError(
                f"{name} expects shape {expected} with size {size} in dimension {dim}, got shape {tuple(x.shape)}"
            )
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point tensor of shape {expected}, got dtype {x.dtype}")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} expects an integer tensor of token ids {expected}, got dtype {x.dtype}")
