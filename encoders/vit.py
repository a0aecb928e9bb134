"""Vision Transformer image (and spectrogram) encoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Mlp, Transformer, init_transformer_, mlp_hidden_dim
from .base import Encoder
from .layers import check_input, get_act_layer, get_norm_layer, to_pair


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Interpolate a ``(prefix + H*W, width)`` positional table to a new patch grid."""
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    width = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)  # (1, width, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width)  # (gh*gw, width)
    return torch.cat([prefix, grid], dim=0)


POOL_TYPES = ("cls", "mean", "map", "queries")


class PatchDropout(nn.Module):
    """Keep a random subset of patch tokens during training (https://arxiv.org/abs/2212.00794)."""

    def __init__(self, prob: float, num_prefix_tokens: int) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, C = patches.shape
        keep = max(1, int(N * (1.0 - self.prob)))
        idx = torch.rand(B, N, device=x.device).topk(keep, dim=-1).indices  # (B, keep)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(B, keep, C))
        return torch.cat([prefix, patches], dim=1)


class AttentionPoolHead(nn.Module):
    """Pool tokens by letting one learned probe attend over them, then a residual MLP (SigLIP's "MAP" head).

    ``a = attn(probe, tokens)`` and ``out = a + mlp(norm(a))``; the probe's attention is the shared
    ``Attention`` (cross-attention: ``q`` of the probe, fused ``kv`` of the tokens).

    Args:
        width: token width.
        heads: attention heads.
        mlp_ratio: hidden size of the MLP relative to ``width``.
        act_layer: activation module class.
        norm_layer: ``factory(dim)`` of the norm before the MLP.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.probe = nn.Parameter(torch.empty(width, **factory))
        self.attn = Attention(width, heads, cross=True, **factory)
        self.norm = norm_layer(width).to(**factory)
        self.mlp = Mlp(width, mlp_hidden_dim(width, mlp_ratio), act_layer=act_layer, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.probe.shape[0] ** -0.5
        nn.init.normal_(self.probe, std=scale)
        for lin in (self.attn.q, self.attn.kv, self.attn.proj):
            nn.init.normal_(lin.weight, std=scale)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, width)`` to ``(B, width)``."""
        probe = self.probe.to(tokens.dtype).expand(tokens.shape[0], 1, -1)  # (B, 1, width)
        x = self.attn(probe, tokens)  # (B, 1, width)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class QueryAttentionPool(nn.Module):
    """Many learned queries attend over the tokens, each giving one output token (CoCa's attentional pooler).

    ``out = norm(attn(norm_q(queries), tokens))``, ``(B, num_queries, dim)``: the cross-attention of
    ``AttentionPoolHead`` (SigLIP's one probe and residual MLP), here with many queries, normalised before
    they attend, the outputs normalised instead of an MLP, and a width of its own (the keys and values are
    projected from the token width).

    Args:
        width: token width (of the keys and values).
        heads: attention heads.
        num_queries: learned queries, one output token each.
        dim: width of the queries and the outputs; ``None`` is ``width``.
        norm_layer: ``factory(dim)`` of the query and output norms.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        num_queries: int,
        dim: int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be at least 1, got {num_queries}")
        factory = {"device": device, "dtype": dtype}
        dim = width if dim is None else dim
        self.queries = nn.Parameter(torch.empty(num_queries, dim, **factory))
        self.norm_q = norm_layer(dim).to(**factory)
        self.attn = Attention(dim, heads, cross=True, context_dim=width, **factory)
        self.norm = norm_layer(dim).to(**factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.queries, std=self.queries.shape[1] ** -0.5)
        for lin in (self.attn.q, self.attn.kv, self.attn.proj):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, width)`` to ``(B, num_queries, dim)``."""
        queries = self.norm_q(self.queries.to(tokens.dtype)).expand(tokens.shape[0], -1, -1)  # (B, Q, dim)
        return self.norm(self.attn(queries, tokens))


class VisionTransformer(Encoder):
    """ViT over images or any 2-D input such as a mel spectrogram.

    Args:
        image_size: input height and width the positional table is built for; other sizes
            that divide by the patch size are handled by interpolating it.
        patch_size: patch height and width.
        in_chans: input channels (3 for RGB, 1 for a spectrogram).
        width: token size.
        layers: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden size of the feed-forward network relative to ``width``.
        output_dim: size of the projected embedding; ``None`` keeps ``width`` with no projection.
        pool_type: ``"cls"`` (class token), ``"mean"`` (mean of patch tokens), ``"map"`` (a learned
            probe attending over the tokens, then a residual MLP: SigLIP's head, ``AttentionPoolHead``) or
            ``"queries"`` (``pool_queries`` learned queries attending over the tokens: CoCa's attentional
            pooler, ``QueryAttentionPool``; the first query's output is pooled, the others are the tokens
            ``pool_with_tokens`` gives a caption decoder).
        pool_queries: learned queries of ``pool_type="queries"``.
        pool_heads: attention heads of the ``"map"`` and ``"queries"`` pools; ``None`` is ``heads``.
        pool_dim: width of the ``"queries"`` pool's queries and outputs (the pooled feature, before
            ``proj``); ``None`` is ``width``.
        class_token: whether a class token is prepended (required for ``pool_type="cls"``).
        act_layer: activation name (``"gelu"``, ``"quick_gelu"``, ...) or module class.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)``.
        norm_eps: epsilon of the normalisation layers.
        pre_norm: apply a norm to the embedded tokens before the blocks (as CLIP does).
        ls_init_value: initial LayerScale value, ``None`` for no LayerScale.
        patch_dropout: fraction of patch tokens dropped in training.
        patch_bias: bias in the patch embedding convolution.
        proj_bias: bias in the output projection.
        drop: dropout after attention and MLP.
        attn_drop: dropout on attention weights.
        modality: reported modality, ``"image"`` or ``"audio"`` for a spectrogram ViT.
        block_heads: heads kept in each block (of width ``width // heads``), after structured
            pruning; ``None``: ``heads`` in every block.
        block_mlp_dims: MLP hidden units of each block, after pruning; ``None``: from ``mlp_ratio``.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int | None = 512,
        pool_type: str = "cls",
        pool_queries: int = 256,
        pool_heads: int | None = None,
        pool_dim: int | None = None,
        class_token: bool = True,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: str | Callable[[int], nn.Module] = "layernorm",
        norm_eps: float = 1e-5,
        pre_norm: bool = True,
        ls_init_value: float | None = None,
        patch_dropout: float = 0.0,
        patch_bias: bool = False,
        proj_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        modality: str = "image",
        block_heads: list[int] | None = None,
        block_mlp_dims: list[int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        if pool_type == "cls" and not class_token:
            raise ValueError("pool_type='cls' needs class_token=True")
        self.modality = modality
        self.image_size = to_pair(image_size)
        self.patch_size = to_pair(patch_size)
        for i, (s, p) in enumerate(zip(self.image_size, self.patch_size)):
            if s % p:
                raise ValueError(
                    f"image_size {self.image_size} must be divisible by patch_size {self.patch_size} (dimension {i})"
                )
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        if pool_dim is not None and pool_type != "queries":
            raise ValueError(f"pool_dim={pool_dim} applies to pool_type='queries' only, not {pool_type!r}")
        self.in_chans = in_chans
        self.width = width
        # the width of the pooled feature (before proj) and of the tokens pool_with_tokens gives with it
        self.pool_dim = pool_dim if pool_dim is not None else width
        self.output_dim = output_dim if output_dim is not None else self.pool_dim
        self.pool_type = pool_type
        self.num_prefix_tokens = 1 if class_token else 0
        factory = {"device": device, "dtype": dtype}
        norm = get_norm_layer(norm_layer, norm_eps)

        self.patch_embed = nn.Conv2d(
            in_chans, width, self.patch_size, stride=self.patch_size, bias=patch_bias, **factory
        )
        self.cls_token = nn.Parameter(torch.empty(width, **factory)) if class_token else None
        num_tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.empty(num_tokens, width, **factory))
        self.patch_dropout = PatchDropout(patch_dropout, self.num_prefix_tokens)
        self.norm_pre = norm(width).to(**factory) if pre_norm else nn.Identity()
        act = get_act_layer(act_layer)
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            act_layer=act,
            norm_layer=norm,
            ls_init_value=ls_init_value,
            drop=drop,
            attn_drop=attn_drop,
            block_heads=block_heads,
            block_mlp_dims=block_mlp_dims,
            **factory,
        )
        self.norm = norm(width).to(**factory)
        pool_heads = heads if pool_heads is None else pool_heads
        self.attn_pool: nn.Module | None = None
        if pool_type == "map":
            self.attn_pool = AttentionPoolHead(width, pool_heads, mlp_ratio, act, norm, **factory)
        elif pool_type == "queries":
            self.attn_pool = QueryAttentionPool(width, pool_heads, pool_queries, pool_dim, norm, **factory)
        self.proj = nn.Linear(self.pool_dim, output_dim, bias=proj_bias, **factory) if output_dim is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.width**-0.5
        if self.attn_pool is not None:
            self.attn_pool.reset_parameters()
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        init_transformer_(self.transformer)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=scale)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def layer_groups(self) -> list[list[nn.Parameter]]:
        stem = [self.patch_embed.weight, self.pos_embed, *self.norm_pre.parameters()]
        stem += [self.cls_token] if self.cls_token is not None else []
        if self.patch_embed.bias is not None:
            stem.append(self.patch_embed.bias)
        head = [*self.norm.parameters(), *(self.proj.parameters() if self.proj is not None else [])]
        head += list(self.attn_pool.parameters()) if self.attn_pool is not None else []
        return [stem, *[list(b.parameters()) for b in self.transformer.blocks], head]

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Permanently resize the positional table to a new input size (e.g. before fine-tuning)."""
        image_size = to_pair(image_size)
        if image_size[0] % self.patch_size[0] or image_size[1] % self.patch_size[1]:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {self.patch_size}")
        new_grid = (image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1])
        with torch.no_grad():
            resized = resample_pos_embed(self.pos_embed.data, self.grid_size, new_grid, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(resized)
        self.image_size, self.grid_size = image_size, new_grid

    def _check(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        expected = f"(B, {self.in_chans}, H, W) with H, W multiples of {self.patch_size}"
        check_input(x, name=name, ndim=4, expected=expected, dim_sizes={1: self.in_chans})
        if x.shape[-2] % self.patch_size[0] or x.shape[-1] % self.patch_size[1]:
            raise ValueError(f"{name} expects shape {expected}, got shape {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = self.patch_embed(x)  # (B, width, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, width)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+gh*gw, width)
        pos = resample_pos_embed(self.pos_embed, self.grid_size, grid, self.num_prefix_tokens)
        x = x + pos.to(x.dtype)
        x = self.patch_dropout(x)
        x = self.norm_pre(x)
        x = self.transformer(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``forward_features`` tokens ``(B, N, width)`` to the pooled feature ``(B, pool_dim)``, before ``proj``."""
        if self.pool_type == "cls":
            return tokens[:, 0]
        if self.pool_type == "map":
            return self.attn_pool(tokens)
        if self.pool_type == "queries":
            return self.attn_pool(tokens)[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def pool_with_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled feature ``(B, pool_dim)`` and the tokens left beside it ``(B, M, pool_dim)``, from one pass
        over the ``forward_features`` tokens: what open_clip's ViT returns with ``output_tokens``, and what
        CoCa's caption decoder reads. With ``"queries"`` pooling, the first query's output and the other
        queries' outputs; otherwise ``pool(tokens)`` and the patch tokens without the class token.
        """
        if self.pool_type == "queries":
            out = self.attn_pool(tokens)  # (B, pool_queries, pool_dim)
            return out[:, 0], out[:, 1:]
        return self.pool(tokens), tokens[:, self.num_prefix_tokens :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.forward_features(x))
        return self.proj(pooled) if self.proj is not None else pooled
