"""Model configs: plain dataclasses that round-trip through JSON and YAML.

A tower is described by an encoder ``type`` (a key of ``ENCODER_TYPES``) and the keyword
arguments of that encoder's constructor, so the constructor stays the single source of truth
for what an encoder accepts.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from polymodal import encoders, fusion

ENCODER_TYPES: dict[str, type[nn.Module]] = {
    "vit": encoders.VisionTransformer,
    "modified_resnet": encoders.ResNetEncoder,
    "torchvision_resnet": encoders.TorchvisionResNetEncoder,
    "timm": encoders.TimmEncoder,
    "text_transformer": encoders.TextTransformer,
    "hf_text": encoders.HFTextEncoder,
    "audio_cnn": encoders.AudioSpectrogramCNN,
}

FUSION_TYPES: dict[str, type[nn.Module]] = {
    "concat": fusion.ConcatFusion,
    "cross_attention": fusion.CrossAttentionFusion,
    "attention": fusion.AttentionFusion,
}

MODEL_KINDS = ("contrastive", "late_fusion", "captioner")


def decoder_types() -> dict[str, type[nn.Module]]:
    """Caption decoders by config type name (imported on demand: ``polymodal.tasks`` pulls in matplotlib)."""
    from polymodal.tasks.captioning import CaptionDecoder

    return {"transformer": CaptionDecoder}


@dataclass
class ComponentConfig:
    """One buildable part: a registered type name and its constructor arguments."""

    type: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    """How text is turned into ids: ``"clip"`` (BPE from open_clip's vocabulary) or ``"hf"`` (a local directory)."""

    type: str = "clip"
    context_length: int = 77
    path: str | None = None


@dataclass
class PreprocessConfig:
    """Input preprocessing bundled with a model, so weights always travel with how to feed them."""

    image_size: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    sample_rate: int | None = None
    clip_seconds: float | None = None


@dataclass
class ModelConfig:
    """A whole model.

    Args:
        name: registry name (or a free label for imported models).
        towers: encoder per modality (``"image"``, ``"text"``, ``"audio"``).
        embed_dim: size of the shared embedding space (contrastive) or unused (late fusion).
        kind: ``"contrastive"``, ``"late_fusion"`` or ``"captioner"`` (an image tower and a caption
            decoder, plus a text tower for a CoCa-style contrastive objective).
        init_logit_scale: initial log temperature multiplier, ``ln(1/0.07)`` as in CLIP.
        max_logit_scale: upper clamp of the log multiplier, ``ln(100)``.
        init_logit_bias: initial bias for the sigmoid loss; ``None`` for no bias.
        fusion: the fusion module of a late-fusion classifier.
        num_classes: classes of a late-fusion classifier's head.
        class_names: optional names of those classes, in the head's order.
        tokenizer: text tokenisation, when a text tower or a caption decoder is present.
        preprocess: image / audio preprocessing.
        decoder: the caption decoder of a captioner (``type`` a key of ``decoder_types()``); its
            ``memory_dim`` defaults to the image tower's width.
    """

    name: str
    towers: dict[str, ComponentConfig]
    embed_dim: int = 512
    kind: str = "contrastive"
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    init_logit_bias: float | None = None
    fusion: ComponentConfig | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    tokenizer: TokenizerConfig | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    decoder: ComponentConfig | None = None

    def __post_init__(self) -> None:
        self.towers = {k: _as(ComponentConfig, v) for k, v in self.towers.items()}
        self.fusion = _as(ComponentConfig, self.fusion) if self.fusion is not None else None
        self.decoder = _as(ComponentConfig, self.decoder) if self.decoder is not None else None
        self.tokenizer = _as(TokenizerConfig, self.tokenizer) if self.tokenizer is not None else None
        self.preprocess = _as(PreprocessConfig, self.preprocess)
        self.validate()

    def validate(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if not self.towers:
            raise ValueError(f"model {self.name!r} has no towers")
        if self.kind == "contrastive" and len(self.towers) < 2:
            raise ValueError(f"a contrastive model needs at least two towers, {self.name!r} has {sorted(self.towers)}")
        if self.kind == "late_fusion" and (self.fusion is None or not self.num_classes):
            raise ValueError("a late-fusion model needs a fusion config and num_classes")
        if self.class_names is not None and (
            len(self.class_names) != self.num_classes
            or len(set(self.class_names)) != len(self.class_names)
            or not all(isinstance(c, str) and c for c in self.class_names)
        ):
            raise ValueError(
                f"class_names must be {self.num_classes} distinct non-empty strings (one per class), "
                f"got {self.class_names!r}"
            )
        if self.kind == "captioner":
            if self.decoder is None or "image" not in self.towers or not set(self.towers) <= {"image", "text"}:
                raise ValueError(
                    f"a captioner needs a decoder config and an image tower (plus optionally a text tower), "
                    f"{self.name!r} has decoder={self.decoder is not None} and towers {sorted(self.towers)}"
                )
        elif self.decoder is not None:
            raise ValueError(f"only captioner models take a decoder; {self.name!r} is a {self.kind} model")
        for modality, tower in self.towers.items():
            validate_component(tower, ENCODER_TYPES, f"towers.{modality}")
        if self.fusion is not None:
            validate_component(self.fusion, FUSION_TYPES, "fusion")
        if self.decoder is not None:
            validate_component(self.decoder, decoder_types(), "decoder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = copy.deepcopy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"polymodal_version", "format"})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _as(kind: type, value: Any) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        return kind(**value)
    raise TypeError(f"expected a {kind.__name__} or a dict, got {type(value).__name__}")


def validate_component(cfg: ComponentConfig, table: dict[str, Any], where: str) -> None:
    """Check that ``cfg.type`` is known and ``cfg.args`` are arguments its constructor accepts."""
    if cfg.type not in table:
        raise ValueError(f"{where}: unknown type {cfg.type!r}; expected one of {sorted(table)}")
    params = inspect.signature(table[cfg.type]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(cfg.args) - set(params) - {"device", "dtype"})
    if unknown:
        raise ValueError(
            f"{where}: {table[cfg.type].__name__} has no arguments {unknown}; "
            f"it accepts {sorted(p for p in params if p not in ('self', 'device', 'dtype'))}"
        )


def build_component(cfg: ComponentConfig, table: dict[str, Any], device=None, dtype=None) -> nn.Module:
    cls = table[cfg.type]
    kwargs = dict(cfg.args)
    params = inspect.signature(cls).parameters
    if "device" in params:
        kwargs["device"] = device
    if "dtype" in params:
        kwargs["dtype"] = dtype
    return cls(**kwargs)


def build_encoder(cfg: ComponentConfig, device=None, dtype=None) -> nn.Module:
    """Build one tower from its config."""
    validate_component(cfg, ENCODER_TYPES, "encoder")
    return build_component(cfg, ENCODER_TYPES, device, dtype)
