"""Late fusion by concatenating pooled embeddings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..encoders.layers import get_act_layer, get_norm_layer
from .inputs import check_batch_sizes, check_feature, check_modalities


class ConcatFusion(nn.Module):
    """Concatenate pooled embeddings ``(B, d_m)`` in sorted modality order, optionally projecting.

    Without ``output_dim`` the result is the plain concatenation of width ``sum(d_m)``; with it a
    linear layer (followed by the optional norm, activation and dropout) maps to ``output_dim``.

    Args:
        input_dims: width of each modality's pooled embedding, keyed by modality name.
        output_dim: width after the projection; ``None`` for no projection.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)`` applied after the projection.
        act_layer: activation name or module class applied after the projection (and norm).
        dropout: dropout on the projected embedding.
        bias: bias in the projection.
    """

    input_kind = "pooled"

    def __init__(
        self,
        input_dims: Mapping[str, int],
        output_dim: int | None = None,
        norm_layer: str | Callable[[int], nn.Module] | None = None,
        act_layer: str | Callable[[], nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("ConcatFusion needs at least one modality in input_dims")
        if output_dim is None and (norm_layer is not None or act_layer is not None or dropout):
            raise ValueError("norm_layer, act_layer and dropout apply to the projection; set output_dim too")
        self.modalities = tuple(sorted(input_dims))
        self.input_dims = {m: int(input_dims[m]) for m in self.modalities}
        concat_dim = sum(self.input_dims.values())
        self.output_dim = output_dim if output_dim is not None else concat_dim
        if output_dim is None:
            self.proj = nn.Identity()
        else:
            layers: list[nn.Module] = [nn.Linear(concat_dim, output_dim, bias=bias, device=device, dtype=dtype)]
            if norm_layer is not None:
                layers.append(get_norm_layer(norm_layer)(output_dim).to(device=device, dtype=dtype))
            if act_layer is not None:
                layers.append(get_act_layer(act_layer)())
            if dropout:
                layers.append(nn.Dropout(dropout))
            self.proj = nn.Sequential(*layers)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fuse ``{modality: (B, d_m)}`` into ``(B, output_dim)``."""
        name = type(self).__name__
        check_modalities(features, self.modalities, name=name)
        for m, d in self.input_dims.items():
            check_feature(features[m], name=name, modality=m, ndims=(2,), expected=f"(B, {d})", dim=d)
        check_batch_sizes(features, name=name)
        x = torch.cat([features[m] for m in self.modalities], dim=-1)  # (B, sum(d_m))
        return self.proj(x)
