"""Assembled models: a contrastive model over two or more towers, and a late-fusion classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.fusion import ContrastiveAlignment

from .checkpoint import PretrainedMixin
from .config import FUSION_TYPES, ModelConfig, build_component, build_encoder


@dataclass
class ContrastiveOutput:
    """What ``ContrastiveModel.forward`` returns.

    Attributes:
        embeddings: L2-normalised embedding ``(B, embed_dim)`` per modality given.
        logit_scale: the temperature multiplier ``exp(log_scale)``, clamped.
        logit_bias: the sigmoid-loss bias, or ``None``.
    """

    embeddings: dict[str, torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


@dataclass
class ClassifierOutput:
    """What ``LateFusionClassifier.forward`` returns: class logits and the fused embedding."""

    logits: torch.Tensor
    fused: torch.Tensor


class ContrastiveModel(PretrainedMixin, nn.Module):
    """Towers keyed by modality projected into one embedding space (CLIP, CLAP, ImageBind-style).

    Args:
        towers: an encoder per modality; each returns ``(B, output_dim)`` from ``forward``.
        alignment: projections into the shared space and the learnable temperature.
        config: the config the model was built from (kept for ``save_pretrained``).
    """

    def __init__(
        self, towers: dict[str, nn.Module], alignment: ContrastiveAlignment, config: ModelConfig | None = None
    ) -> None:
        super().__init__()
        if len(towers) < 2:
            raise ValueError(f"a contrastive model needs at least two towers, got {sorted(towers)}")
        self.towers = nn.ModuleDict({k: towers[k] for k in sorted(towers)})
        self.alignment = alignment
        self.config = config

    @classmethod
    def from_config(cls, config: ModelConfig, device=None, dtype=None) -> ContrastiveModel:
        towers = {m: build_encoder(c, device=device, dtype=dtype) for m, c in config.towers.items()}
        return cls(towers, alignment_from_config(config, towers, device, dtype), config)

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    def encode(self, modality: str, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embed ``x`` with the ``modality`` tower into the shared space."""
        if modality not in self.towers:
            raise ValueError(f"this model has no {modality!r} tower; it has {self.modalities}")
        features = self.towers[modality](x)
        return self.alignment({modality: features}, normalize=normalize)[modality]

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("image", image, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("text", text, normalize)

    def encode_audio(self, audio: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode("audio", audio, normalize)

    def forward(self, **inputs: torch.Tensor) -> ContrastiveOutput:
        unknown = sorted(set(inputs) - set(self.towers))
        if unknown:
            raise ValueError(f"inputs {unknown} have no tower; this model takes {self.modalities}")
        features = {m: self.towers[m](x) for m, x in sorted(inputs.items())}
        return ContrastiveOutput(
            embeddings=self.alignment(features, normalize=True),
            logit_scale=self.alignment.scale(),
            logit_bias=self.alignment.logit_bias,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def lock_tower(self, modality: str, unlocked_layers: int = 0, freeze_norm: bool = False) -> None:
        """Freeze one tower (LiT-style), optionally leaving its last ``unlocked_layers`` groups trainable."""
        if modality not in self.towers:
            raise ValueError(f"this model has no {modality!r} tower; it has {self.modalities}")
        self.towers[modality].lock(unlocked_layers=unlocked_layers, freeze_norm=freeze_norm)


def alignment_from_config(
    config: ModelConfig, towers: dict[str, nn.Module], device=None, dtype=None
) -> ContrastiveAlignment:
    """The shared embedding space of ``towers`` as ``config`` describes it (size, temperature, bias)."""
    return ContrastiveAlignment(
        {m: t.output_dim for m, t in towers.items()},
        config.embed_dim,
        init_logit_scale=config.init_logit_scale,
        max_logit_scale=config.max_logit_scale,
        init_logit_bias=config.init_logit_bias,
    ).to(device=device, dtype=dtype)


class LateFusionClassifier(PretrainedMixin, nn.Module):
    """Encoders per modality, a fusion module over their outputs, and a classification head.

    Fusion modules that work on token sequences (``fusion.input_kind == "tokens"``) get each
    encoder's ``forward_features``; the others get the pooled ``forward`` output. With token fusion,
    build the encoders with ``output_dim=None`` so they carry no unused pooled projection.

    Args:
        encoders: an encoder per modality.
        fusion: combines the per-modality outputs into one vector (or a ``FusionOutput``).
        head: maps the fused vector to logits; an ``int`` builds a linear head with that many classes.
        config: the config the model was built from (kept for ``save_pretrained``).
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        fusion: nn.Module,
        head: nn.Module | int,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({k: encoders[k] for k in sorted(encoders)})
        self.fusion = fusion
        if isinstance(head, int):
            head = nn.Linear(fusion.output_dim, head)
        self.head = head
        self.config = config

    @classmethod
    def from_config(cls, config: ModelConfig, device=None, dtype=None) -> LateFusionClassifier:
        towers = {m: build_encoder(c, device=device, dtype=dtype) for m, c in config.towers.items()}
        fusion = build_component(config.fusion, FUSION_TYPES, device=device, dtype=dtype)
        head = nn.Linear(fusion.output_dim, config.num_classes, device=device, dtype=dtype)
        return cls(towers, fusion, head, config)

    def forward(self, **inputs: torch.Tensor) -> ClassifierOutput:
        missing = sorted(set(self.towers) - set(inputs))
        if missing:
            raise ValueError(f"missing inputs {missing}; this classifier takes {list(self.towers)}")
        wants_tokens = getattr(self.fusion, "input_kind", "pooled") == "tokens"
        feats = {
            m: (self.towers[m].forward_features(inputs[m]) if wants_tokens else self.towers[m](inputs[m]))
            for m in self.towers
        }
        fused = self.fusion(feats)
        fused = getattr(fused, "pooled", fused)
        return ClassifierOutput(logits=self.head(fused), fused=fused)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)


def build_model(config: ModelConfig, device=None, dtype=None) -> nn.Module:
    """Build the model a config describes, with freshly initialised weights."""
    if config.kind == "contrastive":
        return ContrastiveModel.from_config(config, device=device, dtype=dtype)
    if config.kind == "captioner":
        from .captioner import CaptioningModel  # deferred: polymodal.tasks pulls in matplotlib

        return CaptioningModel.from_config(config, device=device, dtype=dtype)
    return LateFusionClassifier.from_config(config, device=device, dtype=dtype)
