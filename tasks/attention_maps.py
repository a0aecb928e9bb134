"""The ViT side of the explanations (``polymodal.tasks.explain``): attention rollout, its gradient-weighted
form, and the patch tokens laid out as a grid for Grad-CAM.

- Attention rollout (Abnar & Zuidema, https://arxiv.org/abs/2005.00928): each block's attention averaged
  over heads, the identity added for the residual connection, rows renormalised, and the blocks multiplied.
  It follows the attention only, so it is the same whatever the text.
- Gradient-weighted rollout (Chefer, Gur & Wolf, https://arxiv.org/abs/2103.15679, the rule for
  self-attention): each head's attention times its gradient of the score, the positive part averaged over
  heads, accumulated as ``R <- R + A R`` from the identity. It follows the text through the gradient.

Both read the attention weights with ``polymodal.encoders.record_attention``. A map is the pooled token's
row of the result over the patches: the class token's, or for a mean-pooled ViT the mean of the patches'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders import VisionTransformer, record_attention

__all__ = [
    "TokenGrid",
    "attention_rollout",
    "gradient_rollout",
    "gradient_rollout_map",
    "rollout_map",
    "token_grid",
]


def _check_start(start: int, blocks: int) -> None:
    if not 0 <= start < blocks:
        raise ValueError(f"rollout start {start} is not one of the {blocks} blocks (0 to {blocks - 1})")


def attention_rollout(weights: Sequence[torch.Tensor], start: int = 0) -> torch.Tensor:
    """Attention rollout ``(B, N, N)`` of per-block attention weights ``(B, heads, N, N)``, first block first.

    Each block's weights are averaged over heads, the identity added for the residual connection and
    the rows renormalised (``(A + I) / 2``), then the blocks from ``start`` on are multiplied, the last on
    the left: row ``i`` says how much each input token flows into output token ``i``.
    """
    _check_start(start, len(weights))
    rollout = None
    for block in weights[start:]:
        mixed = block.mean(dim=1)  # (B, N, N)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def gradient_rollout(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], start: int = 0) -> torch.Tensor:
    """Gradient-weighted rollout ``(B, N, N)``: ``R = I``, then for each block from ``start`` on
    ``R <- R + mean_heads((grad * A)^+) @ R``, with ``A`` its weights ``(B, heads, N, N)`` and ``grad`` the
    score's gradient with respect to them."""
    _check_start(start, len(weights))
    N = weights[0].shape[-1]
    relevance = torch.eye(N, dtype=weights[0].dtype, device=weights[0].device).expand(len(weights[0]), N, N)
    for block, grad in zip(weights[start:], grads[start:]):
        mixed = (grad * block).clamp(min=0).mean(dim=1)  # (B, N, N): heads that raise the score, where they look
        relevance = relevance + mixed @ relevance
    return relevance


def _pooled_map(vit: VisionTransformer, relevance: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pooled token's row of ``relevance (B, N, N)`` over the patches, upsampled to ``size``: ``(B, H, W)``."""
    prefix = vit.num_prefix_tokens
    row = relevance[:, 0, prefix:] if vit.pool_type == "cls" else relevance[:, prefix:, prefix:].mean(dim=1)
    grid = row.reshape(-1, 1, size[0] // vit.patch_size[0], size[1] // vit.patch_size[1])  # (B, 1, gh, gw)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]


def rollout_map(vit: VisionTransformer, inputs: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Attention rollout of ``vit`` over images ``(B, C, H, W)``: the pooled token's row, ``(B, H, W)``."""
    with torch.no_grad(), record_attention(vit.transformer) as records:
        vit(inputs)
    return _pooled_map(vit, attention_rollout([w[0] for w in records.values()], start), tuple(inputs.shape[-2:]))


def gradient_rollout_map(
    vit: VisionTransformer, score: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """Gradient-weighted rollout of ``score(inputs) (B,)`` (computed through ``vit``): ``(B, H, W)``."""
    with torch.enable_grad(), record_attention(vit.transformer) as records:
        total = score(inputs).sum()  # each image's score depends on its own attention only
    weights = [w[0] for w in records.values()]
    grads = torch.autograd.grad(total, weights)
    relevance = gradient_rollout([w.detach() for w in weights], grads, start)
    return _pooled_map(vit, relevance, tuple(inputs.shape[-2:]))


class TokenGrid(nn.Module):
    """The identity on a ``(B, width, gh, gw)`` grid of ViT patch tokens: a layer whose output is laid out as
    captum's ``LayerGradCam`` expects a convolutional feature map (it averages gradients over dims 2 on), for
    it to hook (``token_grid``)."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid


@contextlib.contextmanager
def token_grid(vit: VisionTransformer, grid_size: tuple[int, int]) -> Iterator[TokenGrid]:
    """Route the patch tokens entering ``vit``'s last block through a ``TokenGrid`` for the block's duration.

    The input of the last block rather than its output: a class-token ViT pools token 0 of the output,
    which the other output tokens never reach, so their gradient is zero; the patch tokens entering the
    last block reach it through its attention.
    """
    layer, prefix = TokenGrid(), vit.num_prefix_tokens

    def reshape(block: nn.Module, args: tuple) -> tuple:
        tokens, *rest = args  # (B, prefix + gh*gw, width)
        B, _, C = tokens.shape
        grid = tokens[:, prefix:].transpose(1, 2).reshape(B, C, *grid_size)  # (B, width, gh, gw)
        patches = layer(grid).flatten(2).transpose(1, 2)  # (B, gh*gw, width)
        return (torch.cat([tokens[:, :prefix], patches], dim=1), *rest)

    handle = vit.transformer.blocks[-1].register_forward_pre_hook(reshape)
    try:
        yield layer
    finally:
        handle.remove()
