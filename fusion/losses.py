"""Contrastive losses over every pair of modalities: CLIP's softmax loss and SigLIP's sigmoid loss.

Both take ``{modality: (B, D)}`` features (L2-normalised, as ``ContrastiveAlignment`` returns
them) and the similarity multiplier ``logit_scale`` (already exponentiated, e.g.
``alignment.scale()``). With M modalities the loss is computed for each of the ``M(M-1)/2``
pairs in sorted order (``parts["image-text"]``) and the total is their mean.

Distributed training. When ``torch.distributed`` runs with world size W, each rank's features
are gathered from all ranks with ``all_gather_with_grad`` so every rank sees the global batch
of N = W * B pairs as negatives. Every rank must have the same local batch B. DDP averages
parameter gradients over ranks, and the gather's backward sums each rank's feature gradient
over all ranks, so a rank's parameter gradient averaged by DDP is the gradient of the *mean of
the per-rank losses*. Each loss below is arranged so that this mean is exactly the loss of a
single process on the concatenated global batch, which makes loss and gradients match it:

- ``clip_loss(local_loss=False)``: every rank computes the full ``(N, N)`` logit matrix, so
  each rank's loss *is* the global loss (and the mean of equal values is that value).
- ``clip_loss(local_loss=True)``: rank r computes only its B rows against all N columns
  (labels offset by ``r * B``), both directions; its loss is the mean over its own rows, so
  the mean over ranks of the per-rank losses is the global loss. Cheaper: ``(B, N)`` logits.
- ``siglip_loss``: rank r scores its B rows against all N columns, summed and divided by the
  local B; the mean over ranks is the global ``-1/N * sum_ij log sigmoid(...)``.

In the local modes the value a rank reports is its own share; average it over ranks (e.g.
``all_reduce`` / W) to log the global loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import gather_features, rank_and_world_size, resolve_gather
from .inputs import check_paired_features


@dataclass
class ContrastiveLossOutput:
    """A contrastive loss and its per-pair parts.

    Attributes:
        loss: scalar total, the mean of ``parts``.
        parts: scalar loss of each modality pair, keyed ``"a-b"`` with ``a < b`` (e.g. ``"image-text"``).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_scalar(value: torch.Tensor | float, what: str, name: str) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name} expects a scalar {what}, got shape {tuple(value.shape)}")
    return value.reshape(()) if isinstance(value, torch.Tensor) else value


def clip_loss(
    features: Mapping[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
    *,
    local_loss: bool = False,
    gather: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> ContrastiveLossOutput:
    """Symmetric InfoNCE (CLIP) loss averaged over all pairs of modalities.

    For each pair the logits are ``logit_scale * a @ b.T``; the loss is the mean of the cross
    entropies of rows (a to b) and of columns (b to a), with the matching index as the label.

    Args:
        features: ``{modality: (B, D)}``, L2-normalised, at least two modalities.
        logit_scale: the similarity multiplier (already exponentiated), a scalar.
        local_loss: in distributed runs, score only this rank's rows against the global batch
            instead of the full global matrix (same gradients, less compute; see the module doc).
        gather: gather features from all ranks; ``None`` does so when torch.distributed runs with
            more than one rank, ``False`` keeps each rank's loss on its local batch only.
        group: process group for the gather.
    """
    modalities = check_paired_features(features, "clip_loss")
    logit_scale = _check_scalar(logit_scale, "logit_scale", "clip_loss")
    do_gather = resolve_gather(gather, group, "clip_loss")
    rank, world_size = rank_and_world_size(group) if do_gather else (0, 1)
    local = {m: features[m] for m in modalities}
    glob = gather_features(local, group) if do_gather else local  # {m: (world_size * B, D)}
    batch = local[modalities[0]].shape[0]
    device = local[modalities[0]].device

    if local_loss:
        labels = torch.arange(batch, device=device) + rank * batch
    else:
        labels = torch.arange(world_size * batch, device=device)
    parts = {}
    for a, b in itertools.combinations(modalities, 2):
        if local_loss:
            logits_ab = logit_scale * local[a] @ glob[b].T  # (B, world_size * B)
            logits_ba = logit_scale * local[b] @ glob[a].T  # (B, world_size * B)
        else:
            logits_ab = logit_scale * glob[a] @ glob[b].T  # (N, N)
            logits_ba = logits_ab.T
        parts[f"{a}-{b}"] = (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2
    return ContrastiveLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)


def siglip_loss(
    features: Mapping[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    gather: bool | None = None,
    group: dist.ProcessGroup | None = None,
) -> ContrastiveLossOutput:
    """Sigmoid (SigLIP, https://arxiv.org/abs/2303.15343) loss averaged over all pairs of modalities.

    For each pair ``a < b``: ``-1/B * sum_ij log sigmoid(z_ij * (logit_scale * a_i . b_j + logit_bias))``
    with ``z_ij = +1`` for matching pairs and ``-1`` otherwise. Distributed, this rank's rows of
    ``a`` are scored against the gathered ``b`` of all ranks (see the module doc).

    Args:
        features: ``{modality: (B, D)}``, L2-normalised, at least two modalities.
        logit_scale: the similarity multiplier (already exponentiated), a scalar.
        logit_bias: scalar added to every logit; ``None`` for zero.
        gather: gather features from all ranks; ``None`` does so when torch.distributed runs with
            more than one rank.
        group: process group for the gather.
    """
    modalities = check_paired_features(features, "siglip_loss")
    logit_scale = _check_scalar(logit_scale, "logit_scale", "siglip_loss")
    logit_bias = _check_scalar(logit_bias, "logit_bias", "siglip_loss") if logit_bias is not None else 0.0
    do_gather = resolve_gather(gather, group, "siglip_loss")
    rank, world_size = rank_and_world_size(group) if do_gather else (0, 1)
    local = {m: features[m] for m in modalities}
    # only the column side of each pair (every modality but the first) needs the global batch
    columns = {m: local[m] for m in modalities[1:]}
    glob = gather_features(columns, group) if do_gather else columns  # {m: (world_size * B, D)}
    batch = local[modalities[0]].shape[0]
    device = local[modalities[0]].device

    rows = torch.arange(batch, device=device)
    signs = -torch.ones(batch, world_size * batch, device=device, dtype=local[modalities[0]].dtype)
    signs[rows, rows + rank * batch] = 1.0  # (B, N): +1 for this rank's matching pairs
    parts = {}
    for a, b in itertools.combinations(modalities, 2):
        logits = logit_scale * local[a] @ glob[b].T + logit_bias  # (B, world_size * B)
        parts[f"{a}-{b}"] = -F.logsigmoid(signs * logits).sum() / batch
    return ContrastiveLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)


class ClipLoss(nn.Module):
    """Module form of ``clip_loss``; see it for the arguments."""

    def __init__(
        self, local_loss: bool = False, gather: bool | None = None, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather = gather
        self.group = group

    def forward(self, features: Mapping[str, torch.Tensor], logit_scale: torch.Tensor | float) -> ContrastiveLossOutput:
        return clip_loss(features, logit_scale, local_loss=self.local_loss, gather=self.gather, group=self.group)

    def extra_repr(self) -> str:
        return f"local_loss={self.local_loss}, gather={self.gather}"


class SigLipLoss(nn.Module):
    """Module form of ``siglip_loss``; see it for the arguments."""

    def __init__(self, gather: bool | None = None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.gather = gather
        self.group = group

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> ContrastiveLossOutput:
        return siglip_loss(features, logit_scale, logit_bias, gather=self.gather, group=self.group)

    def extra_repr(self) -> str:
        return f"gather={self.gather}"
