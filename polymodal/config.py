"""Model configs: plain dataclasses that round-trip through JSON and YAML.

A tower is described by an encoder ``type`` (a key of ``ENCODER_TYPES``) and the keyword
arguments of that encoder's constructor, so the constructor stays the single source of truth
for what an encoder accepts, and, where a config leaves a value out, for its default.
``ModelConfig.input_spec`` is the one place that says what a tower takes as input.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from polymodal import encoders, fusion
from polymodal.errors import ConfigError, InputError

from .value_types import annotation_of, check_value

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

# Decoder classes live in ``polymodal.tasks``, which a config must not import just to be read:
# names are checked when a config is validated, the classes imported only to build one.
DECODER_TYPES: dict[str, str] = {
    "transformer": "polymodal.tasks.captioning.decoder:CaptionDecoder",
    # CoCa's, over the text tower's states (open_clip's MultimodalTransformer)
    "multimodal": "polymodal.tasks.captioning.multimodal_decoder:MultimodalTextDecoder",
}

MODEL_KINDS = ("contrastive", "late_fusion", "captioner")

# Audio clips are cut to this length when a config does not say; no encoder constructor has a
# clip length (a spectrogram CNN pools over any length), so the config module is its home.
DEFAULT_CLIP_SECONDS = 1.0


def decoder_types() -> dict[str, type[nn.Module]]:
    """Caption decoders by config type name, imported on demand (``polymodal.tasks`` is heavy)."""
    table = {}
    for name, target in DECODER_TYPES.items():
        module, attr = target.split(":")
        table[name] = getattr(importlib.import_module(module), attr)
    return table


@dataclass
class ComponentConfig:
    """One buildable part: a registered type name and its constructor arguments."""

    type: str
    args: dict[str, Any] = field(default_factory=dict)


# How an "hf" tokenizer cleans text before splitting it (``encoders.clean_text`` modes); CLIP's BPE always lowercases.
TOKENIZER_CLEAN_DEFAULT = "whitespace"


@dataclass
class TokenizerConfig:
    """How text is turned into ids: ``"clip"`` (BPE from open_clip's vocabulary) or ``"hf"`` (a local directory).

    ``context_length`` unset means the text tower's (``ModelConfig.input_spec("text")``). ``clean`` is the
    ``"hf"`` tokenizer's text cleaning (``polymodal.encoders.tokenizer.CLEAN_MODES``; SigLIP's open_clip
    configs use ``"canonicalize"``: lowercase, no punctuation).
    """

    type: str = "clip"
    context_length: int | None = None
    path: str | None = None
    clean: str | None = TOKENIZER_CLEAN_DEFAULT

    def __post_init__(self) -> None:
        from polymodal.encoders.tokenizer import CLEAN_MODES

        if self.clean not in CLEAN_MODES:
            raise ConfigError(f"tokenizer.clean must be one of {list(CLEAN_MODES)}, got {self.clean!r}")
        if self.type == "clip" and self.clean != TOKENIZER_CLEAN_DEFAULT:
            raise ConfigError(
                f"tokenizer.clean={self.clean!r} applies to 'hf' tokenizers; CLIP's BPE always lowercases"
            )


@dataclass
class PreprocessConfig:
    """Input preprocessing bundled with a model, so weights always travel with how to feed them.

    A value left unset is the tower's (its constructor argument, else the constructor's default).
    """

    image_size: int | list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    sample_rate: int | None = None
    clip_seconds: float | None = None


# The linear layers of polymodal's transformer blocks: fused q/k/v, attention output, the MLP's two layers.
LORA_DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through ``peft``) on the linear layers of some towers.

    The adapted towers' own weights are frozen and stay bit-identical; only the adapters train (the
    rest of the model, e.g. the contrastive alignment or a classification head, trains as usual).

    Args:
        towers: the towers to adapt, e.g. ``["image", "text"]``.
        r: rank of each adapter.
        alpha: scaling numerator: an adapter adds ``(alpha / r) * B @ A`` to its layer's weight.
        dropout: dropout on an adapter's input in training.
        targets: names of the linear layers to adapt, matched against the end of each layer's name
            (peft's rule): ``qkv``, ``proj``, ``fc1``, ``fc2`` for polymodal's transformer towers (``proj``
            also matches a tower's output projection), e.g. ``query``, ``value`` for a Hugging Face text tower.
    """

    towers: list[str]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        if isinstance(self.alpha, int) and not isinstance(self.alpha, bool):
            self.alpha = float(self.alpha)
        if isinstance(self.dropout, int) and not isinstance(self.dropout, bool):
            self.dropout = float(self.dropout)
        check_fields(self, "lora")
        need(self.r >= 1, f"lora.r must be a positive integer (the adapters' rank, e.g. 8), got {self.r}")
        need(self.alpha > 0, f"lora.alpha must be positive (e.g. 16), got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        need(bool(self.towers), "lora.towers is empty; name the towers to adapt, e.g. [image, text]")
        need(len(set(self.towers)) == len(self.towers), f"lora.towers names a tower twice: {self.towers}")
        need(
            bool(self.targets) and all(t.strip() for t in self.targets),
            f"lora.targets must name linear layers (e.g. {list(LORA_DEFAULT_TARGETS)}), got {self.targets}",
        )


@dataclass(frozen=True)
class InputSpec:
    """What one tower takes as input, resolved from the config; ``None`` where it does not apply.

    Attributes:
        modality: ``"image"``, ``"audio"`` or ``"text"``.
        image_size: ``(height, width)`` of the images the tower takes.
        channels: image channels.
        mean, std: per-channel normalisation of images.
        interpolation, resize_mode: how images are resized (see ``image_transform``).
        sample_rate: audio samples per second.
        clip_seconds: length audio is cropped or padded to.
        context_length: tokens per text.
    """

    modality: str
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    sample_rate: int | None = None
    clip_seconds: float | None = None
    context_length: int | None = None


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
        decoder: the caption decoder of a captioner (``type`` a key of ``DECODER_TYPES``); its
            ``memory_dim`` defaults to the image tower's width.
        lora: low-rank adapters on some towers (``polymodal.lora``); ``None`` for none.
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
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.towers, dict):
            raise ConfigError(f"towers must be a mapping of modality to tower config, got {self.towers!r}")
        check_fields(self, skip=("towers",))  # each tower is checked below, with its own name
        self.towers = {k: _as(ComponentConfig, v, f"towers.{k}") for k, v in self.towers.items()}
        self.fusion = _as(ComponentConfig, self.fusion, "fusion") if self.fusion is not None else None
        self.decoder = _as(ComponentConfig, self.decoder, "decoder") if self.decoder is not None else None
        self.tokenizer = _as(TokenizerConfig, self.tokenizer, "tokenizer") if self.tokenizer is not None else None
        self.lora = _as(LoraConfig, self.lora, "lora") if self.lora is not None else None
        self.preprocess = _as(PreprocessConfig, self.preprocess, "preprocess")
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` on the first inconsistency, naming the field."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.kind in MODEL_KINDS, f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        need(bool(self.towers), f"model {self.name!r} has no towers")
        need(
            self.kind != "contrastive" or len(self.towers) >= 2,
            f"a contrastive model needs at least two towers, {self.name!r} has {sorted(self.towers)}",
        )
        need(
            self.kind != "late_fusion" or (self.fusion is not None and bool(self.num_classes)),
            "a late-fusion model needs a fusion config and num_classes",
        )
        need(
            self.class_names is None
            or (
                len(self.class_names) == self.num_classes
                and len(set(self.class_names)) == len(self.class_names)
                and all(c for c in self.class_names)
            ),
            f"class_names must be {self.num_classes} distinct non-empty strings (one per class), "
            f"got {self.class_names!r}",
        )
        if self.kind == "captioner":
            need(
                self.decoder is not None and "image" in self.towers and set(self.towers) <= {"image", "text"},
                f"a captioner needs a decoder config and an image tower (plus optionally a text tower), "
                f"{self.name!r} has decoder={self.decoder is not None} and towers {sorted(self.towers)}",
            )
            need(
                self.decoder.type in DECODER_TYPES,
                f"decoder: unknown type {self.decoder.type!r}; expected one of {sorted(DECODER_TYPES)}",
            )
        else:
            need(self.decoder is None, f"only captioner models take a decoder; {self.name!r} is a {self.kind} model")
        for modality, tower in self.towers.items():
            validate_component(tower, ENCODER_TYPES, f"towers.{modality}")
        if self.fusion is not None:
            validate_component(self.fusion, FUSION_TYPES, "fusion")
        if self.lora is not None:
            unknown = [t for t in self.lora.towers if t not in self.towers]
            need(not unknown, f"lora.towers names {unknown}, which this model lacks; it has {sorted(self.towers)}")
        self._check_input_facts()

    def _check_input_facts(self) -> None:
        """A fact given twice (preprocess and tower) must agree, or the transform feeds the tower wrong inputs."""
        pre = self.preprocess
        image = self.towers.get("image")
        tower_size = image.args.get("image_size") if image is not None else None
        if pre.image_size is not None and tower_size is not None and _pair(pre.image_size) != _pair(tower_size):
            raise ConfigError(
                f"preprocess.image_size {pre.image_size!r} disagrees with towers.image.args.image_size "
                f"{tower_size!r}; the transform must produce what the tower takes (set one)"
            )
        audio = self.towers.get("audio")
        # the spectrogram's filters are built for the tower's rate, its constructor default included
        tower_rate = _tower_value(audio, "sample_rate") if audio is not None else None
        if pre.sample_rate is not None and tower_rate is not None and pre.sample_rate != tower_rate:
            raise ConfigError(
                f"preprocess.sample_rate {pre.sample_rate} disagrees with towers.audio.args.sample_rate "
                f"{tower_rate}; audio must be resampled to the rate the tower's spectrogram is built for (set one)"
            )
        text = self.towers.get("text")
        if text is not None and self.tokenizer is not None and self.tokenizer.context_length is not None:
            tower_length = _tower_value(text, "context_length")
            if tower_length is not None and self.tokenizer.context_length > tower_length:
                raise ConfigError(
                    f"tokenizer.context_length {self.tokenizer.context_length} exceeds the text tower's "
                    f"context_length {tower_length}; expected at most {tower_length}"
                )

    @property
    def query_modality(self) -> str:
        """The tower that is queried by text: the one non-text tower of an image-text / audio-text model
        (``"image"`` when there are several, e.g. ImageBind-style). Zero-shot classification, retrieval
        evaluation and explanations all ask this, never re-derive it."""
        query = query_modality_of(self.towers)
        if query is None:
            raise InputError(f"model {self.name!r} has only a text tower, so nothing is queried by text")
        return query

    def input_spec(self, modality: str) -> InputSpec:
        """What the ``modality`` tower takes: the preprocess / tokenizer config, else the tower's
        arguments, else its constructor's defaults. Transforms, tokenizers, data and exporters read this."""
        if modality not in self.towers:
            raise InputError(f"model {self.name!r} has no {modality!r} tower; it has {sorted(self.towers)}")
        tower, pre = self.towers[modality], self.preprocess
        if modality == "image":
            size = pre.image_size if pre.image_size is not None else _tower_value(tower, "image_size")
            defaults = inspect.signature(encoders.image_transform).parameters
            return InputSpec(
                modality,
                image_size=_pair(size) if size is not None else None,
                channels=_tower_value(tower, "in_chans"),
                mean=tuple(pre.mean if pre.mean is not None else defaults["mean"].default),
                std=tuple(pre.std if pre.std is not None else defaults["std"].default),
                interpolation=pre.interpolation,
                resize_mode=pre.resize_mode,
            )
        if modality == "audio":
            rate = pre.sample_rate if pre.sample_rate is not None else _tower_value(tower, "sample_rate")
            clip = pre.clip_seconds if pre.clip_seconds is not None else DEFAULT_CLIP_SECONDS
            return InputSpec(modality, sample_rate=rate, clip_seconds=clip)
        length = self.tokenizer.context_length if self.tokenizer is not None else None
        if length is None:
            length = _tower_value(tower, "context_length")
        return InputSpec(modality, context_length=length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """The config fields in which ``other`` describes another model than this one; ``name`` is a
        label, not the architecture, so it never counts. Empty when the two are the same model."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in set(mine) | set(theirs) if k != "name" and mine.get(k) != theirs.get(k))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping of fields, got {type(data).__name__}")
        data = copy.deepcopy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"polymodal_version", "format"})
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; expected some of {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in data)
        if missing:
            raise ConfigError(f"model config lacks {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})


def query_modality_of(modalities: Iterable[str]) -> str | None:
    """Of some towers, the one text queries: the non-text tower, ``"image"`` when there are several;
    ``None`` when there is only text. ``ModelConfig.query_modality`` applies it to a model's towers."""
    others = sorted(m for m in modalities if m != "text")
    if not others:
        return None
    return "image" if "image" in others else others[0]


def read_json_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; ``ConfigError`` naming the file when it is not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err}); expected a JSON object of config fields") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} holds a JSON {type(data).__name__}; expected an object of config fields")
    return data


def model_config_from_file(path: str | os.PathLike, data: dict[str, Any] | None = None) -> ModelConfig:
    """The ``ModelConfig`` saved in ``path`` (``data``: its contents, when already read); errors name the file."""
    data = read_json_mapping(path) if data is None else data
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{str(path)!r}: {err}") from None


_DATACLASSES = {
    "ComponentConfig": ComponentConfig,
    "TokenizerConfig": TokenizerConfig,
    "PreprocessConfig": PreprocessConfig,
    "LoraConfig": LoraConfig,
}


def check_fields(obj: Any, where: str = "", skip: tuple[str, ...] = ()) -> None:
    """Type-check every field of a config dataclass against its annotation (``ConfigError`` naming it)."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            check_value(getattr(obj, f.name), str(f.type), f"{prefix}{f.name}", _DATACLASSES)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _as(kind: type, value: Any, where: str) -> Any:
    if isinstance(value, kind):
        check_fields(value, where)
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of {kind.__name__} fields, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - fields)
    missing = sorted(f.name for f in dataclasses.fields(kind) if _required(f) and f.name not in value)
    if unknown or missing:
        raise ConfigError(
            f"{where}: unknown keys {unknown} / missing keys {missing}; expected some of {sorted(fields)}"
        )
    part = kind(**value)
    check_fields(part, where)
    return part


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _tower_value(tower: ComponentConfig, name: str) -> Any:
    """A tower's constructor argument ``name`` as configured, else the constructor's default (or ``None``)."""
    if name in tower.args:
        return tower.args[name]
    parameter = inspect.signature(ENCODER_TYPES[tower.type]).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def validate_component(cfg: ComponentConfig, table: dict[str, Any], where: str) -> None:
    """Check that ``cfg.type`` is known and ``cfg.args`` are arguments its constructor accepts, of the
    types its annotations say."""
    if cfg.type not in table:
        raise ConfigError(f"{where}: unknown type {cfg.type!r}; expected one of {sorted(table)}")
    params = inspect.signature(table[cfg.type]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg.args) - set(params) - {"device", "dtype"})
        if unknown:
            raise ConfigError(
                f"{where}: {table[cfg.type].__name__} has no arguments {unknown}; "
                f"it accepts {sorted(p for p in params if p not in ('self', 'device', 'dtype'))}"
            )
    for name, value in cfg.args.items():
        annotation = annotation_of(params[name]) if name in params else None
        if annotation is not None:
            check_value(value, annotation, f"{where}.args.{name}")


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
