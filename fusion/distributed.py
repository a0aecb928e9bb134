"""All-gather with gradient: the one distributed primitive the contrastive and distillation losses use.

Every rank concatenates the features of all ranks (in rank order) to build its negatives. The
local slice of the gathered tensor is differentiable as usual, and the other ranks' slices
send their gradient back to the rank that produced them: in the backward pass each rank holds
``dL_r / d(gathered)``, those are summed over ranks and each rank keeps the slice of its own
batch, ``dx_r = sum_s dL_s / dx_r``. Together with DDP's averaging of parameter gradients this
makes a loss whose mean over ranks equals the single-process loss give exactly the
single-process gradient (see ``polymodal.fusion.losses`` and ``polymodal.fusion.distillation``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the number of ranks; ``(0, 1)`` when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def resolve_gather(gather: bool | None, group: dist.ProcessGroup | None, name: str) -> bool:
    """Whether a loss gathers features from all ranks: ``gather`` as given, or (``None``) whenever
    torch.distributed runs with more than one rank. ``name`` is the loss's, for the error."""
    initialised = dist.is_available() and dist.is_initialized()
    if gather and not initialised:
        raise ValueError(f"{name}(gather=True) needs torch.distributed to be initialised")
    if gather is None:
        return initialised and dist.get_world_size(group) > 1
    return gather


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        rank, world_size = rank_and_world_size(group)
        ctx.group, ctx.rank, ctx.batch = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (world_size * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every rank used every slice; sum those uses and keep the slice this rank produced
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch], None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x (B, ...)`` from all ranks along dim 0 into ``(world_size * B, ...)``, differentiably.

    Every rank must pass the same shape (an equal local batch). Returns ``x`` itself when
    ``torch.distributed`` is not initialised.

    Args:
        x: this rank's tensor.
        group: process group; the default group when ``None``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return _AllGatherWithGrad.apply(x, group)


def gather_features(
    features: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """``all_gather_with_grad`` applied to each modality, in sorted order so every rank issues
    the collectives in the same order."""
    return {m: all_gather_with_grad(features[m], group) for m in sorted(features)}
