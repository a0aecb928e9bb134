"""Assembled models: a contrastive model over two or more towers, and a late-fusion classifier."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal.encoders.layers import to_pair
from polymodal.fusion import ContrastiveAlignment

from .checkpoint import PretrainedMixin
from .config import ENCODER_TYPES, FUSION_TYPES, ModelConfig, build_component, build_encoder
from .errors import ConfigError

# tower attributes that size a positional table, and the model method that changes each with the config
_RESIZERS = {"image_size": "set_image_size", "context_length": "set_context_length"}


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


class ResizableTowersMixin:
    """Resizing a tower's input through the model, so that its config (the home of each tower's input
    spec) follows and a saved model loads again. Saving refuses a model whose towers were resized behind
    the config's back (e.g. ``model.towers["image"].set_image_size`` called directly)."""

    towers: nn.ModuleDict
    config: ModelConfig | None

    def _tower_args(self, modality: str, method: str) -> dict[str, Any]:
        if modality not in self.towers or not hasattr(self.towers[modality], method):
            raise ConfigError(
                f"this model has no {modality!r} tower with {method}(); its towers are {list(self.towers)}"
            )
        if self.config is None:
            raise ConfigError(f"{method}() needs a model built from a ModelConfig, so that the config can follow")
        return self.config.towers[modality].args

    def set_image_size(self, image_size: int | tuple[int, int], modality: str = "image") -> None:
        """Resize the positional table of the ``modality`` tower to a new input size, and the config
        (the tower's ``image_size``, and the image preprocessing) with it."""
        args = self._tower_args(modality, "set_image_size")
        self.towers[modality].set_image_size(image_size)
        size = to_pair(image_size)
        args["image_size"] = size[0] if size[0] == size[1] else list(size)
        if modality == "image" and self.config.preprocess.image_size is not None:
            self.config.preprocess.image_size = args["image_size"]

    def set_context_length(self, context_length: int) -> None:
        """Resize the text tower's positional table to ``context_length`` tokens, and the config (the
        tower's ``context_length`` and the tokenizer's) with it."""
        args = self._tower_args("text", "set_context_length")
        decoder = getattr(self, "decoder", None)
        if decoder is not None and context_length > decoder.context_length:
            raise ConfigError(
                f"context_length {context_length} is longer than the caption decoder's {decoder.context_length} "
                "positions, and the decoder shares the tokenizer"
            )
        self.towers["text"].set_context_length(context_length)
        args["context_length"] = context_length
        if self.config.tokenizer is not None:
            self.config.tokenizer.context_length = context_length

    def check_towers_match_config(self) -> None:
        """Raise a ``ConfigError`` when a tower's input size differs from the one its config states."""
        if self.config is None:
            return
        for modality, tower in self.towers.items():
            cfg = self.config.towers[modality]
            params = inspect.signature(ENCODER_TYPES[cfg.type]).parameters
            for attr, method in _RESIZERS.items():
                if not hasattr(tower, attr) or attr not in params:
                    continue
                stated = cfg.args.get(attr, params[attr].default)
                actual = getattr(tower, attr)
                if attr == "image_size":
                    stated, actual = to_pair(stated), to_pair(actual)
                if stated != actual:
                    raise ConfigError(
                        f"the {modality!r} tower's {attr} is {actual} but the model config says {stated}, so the "
                        f"saved model would not load; resize through the model, model.{method}(...), which "
                        "updates the config too"
                    )

    def write_pretrained_files(self, directory: Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.check_towers_match_config()  # before anything is written: a refused save leaves no directory
        super().write_pretrained_files(directory, state)


class ContrastiveModel(ResizableTowersMixin, PretrainedMixin, nn.Module):
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


class LateFusionClassifier(ResizableTowersMixin, PretrainedMixin, nn.Module):
    """Encoders per modality, a fusion module over their outputs, and a classification head.

    Fusion modules that work on token sequences (``fusion.input_kind == "tokens"``) get each
    encoder's ``forward_features`` and, as ``fusion(features, masks)``, the padding mask of each
    encoder that has padding (``Encoder.token_mask``: a text tower's, from the token ids); the others
    get the pooled ``forward`` output. With token fusion,
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
        if getattr(self.fusion, "input_kind", "pooled") == "tokens":
            feats = {m: self.towers[m].forward_features(inputs[m]) for m in self.towers}
            masks = {}
            for m, tower in self.towers.items():
                # stub towers (nn.Linear, nn.Identity) have no padding to report
                mask = tower.token_mask(inputs[m]) if hasattr(tower, "token_mask") else None
                if mask is not None:
                    masks[m] = mask
            fused = self.fusion(feats, masks)
        else:
            fused = self.fusion({m: self.towers[m](inputs[m]) for m in self.towers})
        fused = getattr(fused, "pooled", fused)
        return ClassifierOutput(logits=self.head(fused), fused=fused)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)


def build_model(config: ModelConfig, device=None, dtype=None) -> nn.Module:
    """Build the model a config describes, with freshly initialised weights (and its LoRA adapters, if any)."""
    if config.kind == "contrastive":
        model = ContrastiveModel.from_config(config, device=device, dtype=dtype)
    elif config.kind == "captioner":
        from .captioner import CaptioningModel  # deferred: polymodal.tasks pulls in matplotlib

        model = CaptioningModel.from_config(config, device=device, dtype=dtype)
    else:
        model = LateFusionClassifier.from_config(config, device=device, dtype=dtype)
    if config.lora is not None:
        from .lora import add_lora

        add_lora(model, config.lora)
        model.to(device=device, dtype=dtype)  # peft builds the adapters on the default device and dtype
    return model
