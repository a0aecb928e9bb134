"""The interface every encoder implements."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of all image, text and audio encoders.

    Subclasses set ``output_dim`` (size of the pooled embedding), ``width`` (size of each
    token from ``forward_features``) and ``modality`` (``"image"``, ``"text"`` or ``"audio"``).
    """

    modality: str = ""
    output_dim: int
    width: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the token sequence ``(B, N, width)`` before pooling."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled embedding ``(B, output_dim)``."""
        raise NotImplementedError

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B, N)`` bool, True on the real tokens of ``forward_features(x)`` and False on padding;
        ``None`` when every token is real (images, audio). Token-level fusion needs it so that no
        token attends to, or is pooled with, padding."""
        return None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory by recomputing activations in the backward pass."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def lock(self, unlocked_layers: int = 0, freeze_norm: bool = False) -> None:
        """Freeze the encoder, optionally leaving its last ``unlocked_layers`` groups trainable.

        Subclasses that know their layer structure override ``layer_groups``; the default
        freezes everything.
        """
        groups = self.layer_groups()
        for p in self.parameters():
            p.requires_grad_(False)
        if unlocked_layers > 0:
            for group in groups[-unlocked_layers:]:
                for p in group:
                    p.requires_grad_(True)
        if freeze_norm:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by depth from input to output, used by ``lock`` to unfreeze the last few."""
        return [list(self.parameters())]
