"""Fusion by cross-attention: the tokens of one modality attend to the tokens of another.

The blocks are ``encoders.attention.CrossAttentionBlock``, the one attention module of the project."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..encoders.attention import CrossAttentionBlock
from ..encoders.layers import get_act_layer, get_norm_layer
from .inputs import check_batch_sizes, check_feature, check_modalities


@dataclass
class FusionOutput:
    """What ``CrossAttentionFusion`` returns.

    Attributes:
        pooled: ``(B, output_dim)`` mean of the kept fused tokens (of both streams when bidirectional),
            through the optional output projection.
        tokens: ``(B, N_query, dim)`` fused query tokens; when bidirectional
            ``(B, N_query + N_context, dim)``, the query stream followed by the context stream.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``tokens (B, N, D)`` over the positions where ``mask (B, N)`` is True."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


class CrossAttentionFusion(nn.Module):
    """Tokens of ``query_modality`` attend to the tokens of ``context_modality`` through a block stack.

    Inputs are ``(B, N, d_m)`` token sequences or pooled ``(B, d_m)`` vectors (treated as
    one-token sequences); each is linearly projected to ``dim`` when ``d_m != dim``. With
    ``bidirectional=True`` a second stack lets the context attend to the query; the two streams
    are updated together, layer by layer, each attending to the other's previous layer, and
    their pooled vectors are concatenated.

    Args:
        query_modality: the modality whose tokens are updated (and pooled).
        context_modality: the modality attended to.
        dim: token width inside the fusion blocks.
        heads: attention heads per block.
        layers: number of cross-attention blocks (per direction).
        input_dims: width of each of the two modalities' inputs.
        bidirectional: also run context-to-query attention and combine both streams.
        output_dim: width of ``pooled`` after a linear projection; ``None`` for no projection
            (``dim``, or ``2 * dim`` when bidirectional).
        mlp_ratio: hidden size of the feed-forward networks relative to ``dim``.
        qkv_bias: bias in the query and key/value projections.
        act_layer: activation name or module class.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)``.
        norm_eps: epsilon of the normalisation layers.
        drop: dropout after attention and MLP.
        attn_drop: dropout on attention weights.
    """

    input_kind = "tokens"  # models feed it encoders' forward_features rather than pooled outputs

    def __init__(
        self,
        query_modality: str,
        context_modality: str,
        dim: int,
        heads: int,
        layers: int,
        input_dims: Mapping[str, int],
        bidirectional: bool = False,
        output_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: str | Callable[[int], nn.Module] = "layernorm",
        norm_eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if query_modality == context_modality:
            raise ValueError(f"{name} needs two different modalities, got {query_modality!r} twice")
        check_modalities(input_dims, (query_modality, context_modality), name=name, what="input_dims")
        self.query_modality = query_modality
        self.context_modality = context_modality
        self.modalities = tuple(sorted((query_modality, context_modality)))
        self.input_dims = {m: int(input_dims[m]) for m in self.modalities}
        self.dim = dim
        self.bidirectional = bidirectional
        self.grad_checkpointing = False
        factory = {"device": device, "dtype": dtype}
        norm = get_norm_layer(norm_layer, norm_eps)
        act = get_act_layer(act_layer)

        self.input_proj = nn.ModuleDict(
            {m: nn.Linear(d, dim, **factory) if d != dim else nn.Identity() for m, d in self.input_dims.items()}
        )

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                CrossAttentionBlock(dim, heads, mlp_ratio, qkv_bias, act, norm, drop, attn_drop, **factory)
                for _ in range(layers)
            )

        self.blocks = stack()
        self.norm = norm(dim).to(**factory)
        self.reverse_blocks = stack() if bidirectional else None
        self.reverse_norm = norm(dim).to(**factory) if bidirectional else None
        pooled_dim = 2 * dim if bidirectional else dim
        self.head = nn.Linear(pooled_dim, output_dim, **factory) if output_dim is not None else nn.Identity()
        self.output_dim = output_dim if output_dim is not None else pooled_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, context, mask, use_reentrant=False)
        return block(x, context, mask)

    def _check_masks(
        self, masks: Mapping[str, torch.Tensor], tokens: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | None]:
        name = type(self).__name__
        if not isinstance(masks, Mapping) or not set(masks) <= set(self.modalities):
            got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
            raise ValueError(f"{name} expects masks keyed by a subset of {list(self.modalities)}, got {got}")
        checked: dict[str, torch.Tensor | None] = dict.fromkeys(self.modalities)
        for m, mask in masks.items():
            shape = tuple(tokens[m].shape[:2])
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name} expects a bool mask of shape {shape} (True = keep) for {m!r}, got {got}")
            # an all-padding row would give NaN attention and an empty mean
            if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
                raise ValueError(f"{name}: every sample needs at least one kept token in the mask for {m!r}")
            checked[m] = mask
        return checked

    def forward(
        self, features: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        """Fuse ``{modality: (B, N_m, d_m) or (B, d_m)}``.

        Args:
            features: tokens (or pooled vectors) of the query and context modalities.
            masks: optional ``{modality: BoolTensor (B, N_m)}``, True for real tokens and False for
                padding; padded context tokens are never attended to and padded query tokens are
                left out of the pooled mean.
        """
        name = type(self).__name__
        check_modalities(features, self.modalities, name=name)
        tokens = {}
        for m in self.modalities:
            d = self.input_dims[m]
            x = features[m]
            check_feature(x, name=name, modality=m, ndims=(2, 3), expected=f"(B, N, {d}) or (B, {d})", dim=d)
            tokens[m] = x.unsqueeze(1) if x.ndim == 2 else x  # (B, N_m, d_m)
        check_batch_sizes(tokens, name=name)
        mask = self._check_masks(masks if masks is not None else {}, tokens)

        qm, cm = self.query_modality, self.context_modality
        q = self.input_proj[qm](tokens[qm])  # (B, N_query, dim)
        c = self.input_proj[cm](tokens[cm])  # (B, N_context, dim)
        if self.reverse_blocks is None:
            for block in self.blocks:
                q = self._run(block, q, c, mask[cm])
            q = self.norm(q)
            return FusionOutput(pooled=self.head(masked_mean(q, mask[qm])), tokens=q)

        for block, reverse in zip(self.blocks, self.reverse_blocks):
            q, c = self._run(block, q, c, mask[cm]), self._run(reverse, c, q, mask[qm])
        q, c = self.norm(q), self.reverse_norm(c)
        pooled = torch.cat([masked_mean(q, mask[qm]), masked_mean(c, mask[cm])], dim=-1)  # (B, 2 * dim)
        return FusionOutput(pooled=self.head(pooled), tokens=torch.cat([q, c], dim=1))
