"""Transformer building blocks shared by the image, text and audio encoders.

Attention uses one fused qkv projection and ``F.scaled_dot_product_attention`` so the
same block runs the fastest available kernel on CPU and CUDA and stays exportable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal and attn_mask is None,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, width)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ls_init_value: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim).to(device=device, dtype=dtype)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, device=device, dtype=dtype
        )
        self.ls1 = LayerScale(dim, ls_init_value, device, dtype) if ls_init_value else nn.Identity()
        self.norm2 = norm_layer(dim).to(device=device, dtype=dtype)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=act_layer, drop=drop, device=device, dtype=dtype)
        self.ls2 = LayerScale(dim, ls_init_value, device, dtype) if ls_init_value else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks with optional gradient checkpointing."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ls_init_value: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                mlp_ratio,
                qkv_bias,
                act_layer,
                norm_layer,
                ls_init_value,
                drop,
                attn_drop,
                device=device,
                dtype=dtype,
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


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


def init_transformer_(transformer: Transformer) -> None:
    """CLIP-style initialisation: residual projections scaled down with depth."""
    width, layers = transformer.width, max(len(transformer.blocks), 1)
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
