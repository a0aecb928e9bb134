"""Projection of every modality into one shared space, with the learned logit scale (and bias)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_feature


class ContrastiveAlignment(nn.Module):
    """Per-modality projections into a shared ``embed_dim`` space plus CLIP's learned temperature.

    ``logit_scale`` is stored in log space, so the similarity multiplier is ``exp(logit_scale)``
    (``1 / 0.07`` at CLIP's initialisation); ``scale()`` clamps it to ``[0, max_logit_scale]``
    before exponentiating, so the loss never sees an out-of-range value even between calls
    to ``clamp_()``. ``logit_bias`` exists only when ``init_logit_bias`` is given (the sigmoid
    loss; SigLIP starts from ``init_logit_scale=log(10)``, ``init_logit_bias=-10``).

    Args:
        input_dims: width of each modality's pooled embedding; a modality whose width is
            ``None`` or already ``embed_dim`` passes through unchanged (``nn.Identity``).
        embed_dim: width of the shared space.
        init_logit_scale: initial value of ``logit_scale`` (log of the multiplier).
        max_logit_scale: upper clamp of ``logit_scale``.
        init_logit_bias: initial ``logit_bias``; ``None`` for no bias.
        learn_logit_scale: whether ``logit_scale`` is trained.
    """

    def __init__(
        self,
        input_dims: Mapping[str, int | None],
        embed_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        init_logit_bias: float | None = None,
        learn_logit_scale: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("ContrastiveAlignment needs at least one modality in input_dims")
        factory = {"device": device, "dtype": dtype}
        self.modalities = tuple(sorted(input_dims))
        self.input_dims = {m: input_dims[m] for m in self.modalities}
        self.embed_dim = embed_dim
        self.max_logit_scale = max_logit_scale
        self.proj = nn.ModuleDict()
        for m, d in self.input_dims.items():
            if d is None or d == embed_dim:
                self.proj[m] = nn.Identity()
            else:
                self.proj[m] = nn.Linear(d, embed_dim, bias=False, **factory)
                nn.init.normal_(self.proj[m].weight, std=d**-0.5)
        self.logit_scale = nn.Parameter(
            torch.tensor(float(init_logit_scale), **factory), requires_grad=learn_logit_scale
        )
        bias = torch.tensor(float(init_logit_bias), **factory) if init_logit_bias is not None else None
        self.logit_bias = nn.Parameter(bias) if bias is not None else None

    def scale(self) -> torch.Tensor:
        """The similarity multiplier ``exp(clamp(logit_scale, 0, max_logit_scale))`` (a scalar)."""
        return self.logit_scale.clamp(0, self.max_logit_scale).exp()

    def temperature(self) -> torch.Tensor:
        """The softmax temperature ``1 / scale()`` (0.07 at CLIP's initialisation)."""
        return self.scale().reciprocal()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``logit_scale`` in ``[0, max_logit_scale]``; call after each optimiser step."""
        self.logit_scale.clamp_(0, self.max_logit_scale)

    def project(self, modality: str, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Project one modality's ``(..., d_m)`` embedding into the shared space ``(..., embed_dim)``."""
        name = type(self).__name__
        if modality not in self.proj:
            raise ValueError(f"{name} has no projection for {modality!r}; known modalities {list(self.modalities)}")
        d = self.input_dims[modality]
        check_feature(x, name=name, modality=modality, ndims=tuple(range(1, 8)), expected=f"(..., {d or 'd'})", dim=d)
        if d is None and x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{name} passes {modality!r} through unchanged, so it expects width {self.embed_dim},"
                f" got shape {tuple(x.shape)}"
            )
        x = self.proj[modality](x)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, features: Mapping[str, torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
        """Project (and L2-normalise) each given modality; any subset of ``input_dims`` may be given.

        Returns:
            ``{modality: (B, embed_dim)}`` in sorted modality order.
        """
        if not isinstance(features, Mapping):
            raise ValueError(
                f"{type(self).__name__} expects a dict of features keyed by modality, got {type(features).__name__}"
            )
        return {m: self.project(m, features[m], normalize=normalize) for m in sorted(features)}

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, max_logit_scale={self.max_logit_scale:.4g}"
