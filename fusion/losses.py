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

from .distributed import all_gather_with_grad, gather_features, rank_and_world_size, resolve_gather
from .inputs import check_paired_features
from .tiled import DEFAULT_TILE, check_tile, positive_mask, tiled_infonce, tiled_sigmoid


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


AUTO_TILE_LOGITS = 4096 * 4096
"""``tile="auto"`` takes the tiled path for a logit matrix larger than this (64 MiB per fp32 copy; the naive
loss's autograd keeps several such copies), and the naive one, a little faster, below it."""


def _resolve_tile(tile: int | str | None, rows: int, cols: int, name: str) -> int | None:
    """The block side for a ``rows x cols`` logit matrix; ``None``: the naive, whole-matrix path."""
    if tile == "auto":
        return DEFAULT_TILE if rows * cols > AUTO_TILE_LOGITS else None
    if tile is None:
        return None
    try:
        return check_tile(tile)
    except ValueError:
        raise ValueError(f"{name}: tile must be 'auto', None or a positive integer (e.g. 4096), got {tile!r}") from None


def _check_groups(groups: torch.Tensor | None, batch: int, offset: int, device, name: str) -> torch.Tensor:
    """This rank's ``(B,)`` int64 group ids: ``groups`` as given, or ``offset + arange(B)`` (one positive each)."""
    if groups is None:
        return torch.arange(batch, device=device) + offset
    if not isinstance(groups, torch.Tensor) or groups.shape != (batch,) or groups.is_floating_point():
        got = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
        raise ValueError(f"{name}: groups must be a ({batch},) integer tensor of group ids, one per sample; got {got}")
    if batch and int(groups.min()) < 0:
        low = int(groups.min())
        raise ValueError(f"{name}: group ids must be >= 0 (samples with equal ids are positives), got {low}")
    return groups.to(device=device, dtype=torch.long)


def _check_negatives(negatives, features, name: str) -> dict[str, torch.Tensor]:
    """``{modality: (K, D)}`` extra negatives, checked against the features they are scored with."""
    if not negatives:
        return {}
    if not isinstance(negatives, Mapping):
        raise ValueError(f"{name}: negatives must be a dict of (K, D) features keyed by modality")
    width = next(iter(features.values())).shape[1]
    out = {}
    for m, x in sorted(negatives.items()):
        if m not in features:
            raise ValueError(f"{name}: negatives for {m!r}, a modality without features (have {sorted(features)})")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: negatives[{m!r}] must be (K, {width}) features, got {got}")
        out[m] = x
    return out


def _with_negatives(x: torch.Tensor, groups: torch.Tensor, negatives: torch.Tensor | None):
    """``x`` with ``negatives`` appended, and their group ids (-1 for a negative: it matches nothing)."""
    if negatives is None or negatives.shape[0] == 0:
        return x, groups
    return torch.cat([x, negatives]), torch.cat([groups, groups.new_full((negatives.shape[0],), -1)])


def _dense_infonce(q, k, scale, q_groups, k_groups, columns: bool, one_each: bool):
    """``tiled_infonce`` over the whole logit matrix at once (autograd keeps it). ``one_each``: the default
    groups, where a row's group id is the index of its one positive column (and, with ``columns``, the rows
    are the whole batch in order), so plain cross entropy with those labels needs no ``(R, C)`` mask."""
    logits = scale * q @ k.T
    if one_each:
        row = F.cross_entropy(logits, q_groups)
        if not columns:
            return row, row.new_zeros(())
        valid = k_groups >= 0
        return row, F.cross_entropy(logits.T[valid], k_groups[valid])
    pos = positive_mask(q_groups, k_groups).to(logits.dtype)
    row = F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))  # SupCon: lse - mean of positive logits
    if not columns:
        return row, row.new_zeros(())
    valid = k_groups >= 0
    pos_t = pos.T[valid]
    return row, F.cross_entropy(logits.T[valid], pos_t / pos_t.sum(1, keepdim=True))


def _infonce(q, k, scale, q_groups, k_groups, tile, columns: bool, one_each: bool, name: str):
    block = _resolve_tile(tile, q.shape[0], k.shape[0], name)
    if block is None:
        return _dense_infonce(q, k, scale, q_groups, k_groups, columns, one_each)
    return tiled_infonce(q, k, scale, q_groups, k_groups, tile=block, columns=columns)


def _gather_extras(groups, negatives, do_gather: bool, group):
    """The global group ids and negatives (every rank's, in rank order), or the local ones."""
    if not do_gather:
        return groups, negatives
    return all_gather_with_grad(groups, group), gather_features(negatives, group)


def clip_loss(
    features: Mapping[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
    *,
    local_loss: bool = False,
    gather: bool | None = None,
    group: dist.ProcessGroup | None = None,
    groups: torch.Tensor | None = None,
    negatives: Mapping[str, torch.Tensor] | None = None,
    tile: int | str | None = "auto",
) -> ContrastiveLossOutput:
    """Symmetric InfoNCE (CLIP) loss averaged over all pairs of modalities, with several positives per
    sample and extra negatives when asked.

    For each pair the logits are ``logit_scale * a @ b.T``; the loss is the mean of the row (a to b) and
    column (b to a) terms. Each row's term is ``logsumexp_j s_ij - mean_{j positive} s_ij`` (SupCon's
    multi-positive InfoNCE), which with one positive per row is CLIP's cross entropy with the matching
    index as the label.

    Args:
        features: ``{modality: (B, D)}``, L2-normalised, at least two modalities.
        logit_scale: the similarity multiplier (already exponentiated), a scalar.
        local_loss: in distributed runs, score only this rank's rows against the global batch
            instead of the full global matrix (same gradients, less compute; see the module doc).
        gather: gather features from all ranks; ``None`` does so when torch.distributed runs with
            more than one rank, ``False`` keeps each rank's loss on its local batch only.
        group: process group for the gather.
        groups: ``(B,)`` integer ids (>= 0): samples with equal ids are positives of each other (two
            captions of one image, two images of one class). Ids are global: distributed, equal ids on
            two ranks match. ``None``: each sample is its own group (CLIP).
        negatives: ``{modality: (K, D)}`` extra features that are never positive, added as columns where
            that modality is the column side (hard-negative captions for image to text). Distributed,
            every rank's are gathered, with the same K on each rank.
        tile: compute in ``tile x tile`` blocks that are recomputed in the backward pass, so memory is
            linear in the batch (``polymodal.fusion.tiled``); ``None``: the whole matrix at once;
            ``"auto"``: tiled when a matrix has more than ``AUTO_TILE_LOGITS`` logits.
    """
    modalities = check_paired_features(features, "clip_loss")
    logit_scale = _check_scalar(logit_scale, "logit_scale", "clip_loss")
    do_gather = resolve_gather(gather, group, "clip_loss")
    rank, _ = rank_and_world_size(group) if do_gather else (0, 1)
    local = {m: features[m] for m in modalities}
    batch = local[modalities[0]].shape[0]
    local_groups = _check_groups(groups, batch, rank * batch, local[modalities[0]].device, "clip_loss")
    negatives = _check_negatives(negatives, local, "clip_loss")
    glob = gather_features(local, group) if do_gather else local  # {m: (world_size * B, D)}
    glob_groups, glob_neg = _gather_extras(local_groups, negatives, do_gather, group)
    one_each = groups is None  # default ids: each equals the index of its sample's column in the global batch

    parts = {}
    for a, b in itertools.combinations(modalities, 2):
        cols_b, k_groups_b = _with_negatives(glob[b], glob_groups, glob_neg.get(b))
        if local_loss or a in glob_neg:
            # each direction on its own: this rank's rows (or all rows) against every column of the other side
            rows, row_groups = (local, local_groups) if local_loss else (glob, glob_groups)
            cols_a, k_groups_a = _with_negatives(glob[a], glob_groups, glob_neg.get(a))
            ab, _ = _infonce(rows[a], cols_b, logit_scale, row_groups, k_groups_b, tile, False, one_each, "clip_loss")
            ba, _ = _infonce(rows[b], cols_a, logit_scale, row_groups, k_groups_a, tile, False, one_each, "clip_loss")
        else:  # both directions from one (N, N + K) matrix: its rows and its columns
            ab, ba = _infonce(glob[a], cols_b, logit_scale, glob_groups, k_groups_b, tile, True, one_each, "clip_loss")
        parts[f"{a}-{b}"] = (ab + ba) / 2
    return ContrastiveLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)


def siglip_loss(
    features: Mapping[str, torch.Tensor],
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    gather: bool | None = None,
    group: dist.ProcessGroup | None = None,
    groups: torch.Tensor | None = None,
    negatives: Mapping[str, torch.Tensor] | None = None,
    tile: int | str | None = "auto",
) -> ContrastiveLossOutput:
    """Sigmoid (SigLIP, https://arxiv.org/abs/2303.15343) loss averaged over all pairs of modalities.

    For each pair ``a < b``: ``-1/B * sum_ij log sigmoid(z_ij * (logit_scale * a_i . b_j + logit_bias))``
    with ``z_ij = +1`` for pairs in one group (by default: the matching pairs) and ``-1`` otherwise.
    Distributed, this rank's rows of ``a`` are scored against the gathered ``b`` of all ranks (see the
    module doc).

    Args:
        features: ``{modality: (B, D)}``, L2-normalised, at least two modalities.
        logit_scale: the similarity multiplier (already exponentiated), a scalar.
        logit_bias: scalar added to every logit; ``None`` for zero.
        gather: gather features from all ranks; ``None`` does so when torch.distributed runs with
            more than one rank.
        group: process group for the gather.
        groups: ``(B,)`` global integer group ids, as for ``clip_loss``.
        negatives: ``{modality: (K, D)}`` extra features scored only as negatives: extra columns where
            the modality is the column side (gathered from every rank), extra rows of this rank where it
            is the row side. The sum is still divided by B.
        tile: as for ``clip_loss``.
    """
    modalities = check_paired_features(features, "siglip_loss")
    logit_scale = _check_scalar(logit_scale, "logit_scale", "siglip_loss")
    logit_bias = _check_scalar(logit_bias, "logit_bias", "siglip_loss") if logit_bias is not None else 0.0
    do_gather = resolve_gather(gather, group, "siglip_loss")
    rank, _ = rank_and_world_size(group) if do_gather else (0, 1)
    local = {m: features[m] for m in modalities}
    batch = local[modalities[0]].shape[0]
    local_groups = _check_groups(groups, batch, rank * batch, local[modalities[0]].device, "siglip_loss")
    negatives = _check_negatives(negatives, local, "siglip_loss")
    # only the column side of each pair (every modality but the first) needs the global batch
    columns = {m: local[m] for m in modalities[1:]}
    glob = gather_features(columns, group) if do_gather else columns  # {m: (world_size * B, D)}
    column_negatives = {m: x for m, x in negatives.items() if m in columns}
    glob_groups, glob_neg = _gather_extras(local_groups, column_negatives, do_gather, group)

    parts = {}
    for a, b in itertools.combinations(modalities, 2):
        rows, row_groups = _with_negatives(local[a], local_groups, negatives.get(a))
        cols, col_groups = _with_negatives(glob[b], glob_groups, glob_neg.get(b))
        block = _resolve_tile(tile, rows.shape[0], cols.shape[0], "siglip_loss")
        if block is None:
            logits = logit_scale * rows @ cols.T + logit_bias
            signs = positive_mask(row_groups, col_groups).to(logits.dtype) * 2 - 1
            parts[f"{a}-{b}"] = -F.logsigmoid(signs * logits).sum() / batch
        else:
            mean = tiled_sigmoid(rows, cols, logit_scale, logit_bias, row_groups, col_groups, tile=block)
            parts[f"{a}-{b}"] = mean * (rows.shape[0] / batch)
    return ContrastiveLossOutput(loss=torch.stack(list(parts.values())).mean(), parts=parts)


class ClipLoss(nn.Module):
    """Module form of ``clip_loss``; see it for the arguments."""

    def __init__(
        self,
        local_loss: bool = False,
        gather: bool | None = None,
        group: dist.ProcessGroup | None = None,
        tile: int | str | None = "auto",
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather = gather
        self.group = group
        self.tile = tile

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        logit_scale: torch.Tensor | float,
        groups: torch.Tensor | None = None,
        negatives: Mapping[str, torch.Tensor] | None = None,
    ) -> ContrastiveLossOutput:
        return clip_loss(
            features,
            logit_scale,
            local_loss=self.local_loss,
            gather=self.gather,
            group=self.group,
            groups=groups,
            negatives=negatives,
            tile=self.tile,
        )

    def extra_repr(self) -> str:
        return f"local_loss={self.local_loss}, gather={self.gather}, tile={self.tile!r}"


class SigLipLoss(nn.Module):
    """Module form of ``siglip_loss``; see it for the arguments."""

    def __init__(
        self, gather: bool | None = None, group: dist.ProcessGroup | None = None, tile: int | str | None = "auto"
    ) -> None:
        super().__init__()
        self.gather = gather
        self.group = group
        self.tile = tile

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        groups: torch.Tensor | None = None,
        negatives: Mapping[str, torch.Tensor] | None = None,
    ) -> ContrastiveLossOutput:
        return siglip_loss(
            features,
            logit_scale,
            logit_bias,
            gather=self.gather,
            group=self.group,
            groups=groups,
            negatives=negatives,
            tile=self.tile,
        )

    def extra_repr(self) -> str:
        return f"gather={self.gather}, tile={self.tile!r}"
