"""Fusion by a learned, per-sample softmax weighting of the modalities."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..encoders.layers import get_act_layer
from .inputs import check_batch_sizes, check_feature, check_modalities


class AttentionFusion(nn.Module):
    """Weighted sum of per-modality projections, the weights scored per sample.

    Each pooled embedding ``(B, d_m)`` is projected to ``dim``; one small MLP shared by all
    modalities scores each projection, a softmax over the modalities (in sorted order) turns the
    scores into weights, and the output is the weighted sum ``(B, dim)``. The weights of the
    last call are kept, detached, in ``last_weights`` ``(B, num_modalities)``;
    ``forward_with_weights`` returns them with their graph.

    Args:
        input_dims: width of each modality's pooled embedding, keyed by modality name.
        dim: width of the projections and of the output.
        hidden_dim: hidden width of the scoring MLP; defaults to ``dim``.
        act_layer: activation of the scoring MLP, by name or module class.
        dropout: dropout on the projections before scoring and summing.
    """

    input_kind = "pooled"

    def __init__(
        self,
        input_dims: Mapping[str, int],
        dim: int,
        hidden_dim: int | None = None,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("AttentionFusion needs at least one modality in input_dims")
        factory = {"device": device, "dtype": dtype}
        self.modalities = tuple(sorted(input_dims))
        self.input_dims = {m: int(input_dims[m]) for m in self.modalities}
        self.output_dim = dim
        hidden_dim = hidden_dim if hidden_dim is not None else dim
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim, **factory) for m, d in self.input_dims.items()})
        self.score = nn.Sequential(
            nn.Linear(dim, hidden_dim, **factory),
            get_act_layer(act_layer)(),
            # no bias: a constant added to every modality's score cancels in the softmax, so it could
            # never learn (its gradient is zero, exactly or to rounding, depending on the CPU)
            nn.Linear(hidden_dim, 1, bias=False, **factory),
        )
        self.dropout = nn.Dropout(dropout)
        self.last_weights: torch.Tensor | None = None

    def forward_with_weights(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the fused ``(B, dim)`` and the modality weights ``(B, num_modalities)``."""
        name = type(self).__name__
        check_modalities(features, self.modalities, name=name)
        for m in self.modalities:
            d = self.input_dims[m]
            check_feature(features[m], name=name, modality=m, ndims=(2,), expected=f"(B, {d})", dim=d)
        check_batch_sizes(features, name=name)
        projected = torch.stack([self.proj[m](features[m]) for m in self.modalities], dim=1)  # (B, M, dim)
        projected = self.dropout(projected)
        weights = self.score(projected).squeeze(-1).softmax(dim=-1)  # (B, M)
        fused = (weights.unsqueeze(-1) * projected).sum(dim=1)  # (B, dim)
        self.last_weights = weights.detach()
        return fused, weights

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fuse ``{modality: (B, d_m)}`` into ``(B, dim)``."""
        return self.forward_with_weights(features)[0]
