"""The one place that says what a model reference means and turns it into a model.

A reference is one of:

- a ``ModelConfig``;
- a registered name (``list_models()``), e.g. ``"clip-vit-tiny"``;
- a directory: a saved polymodal model (``save_pretrained``) or training checkpoint, a training
  run directory (``polymodal train``'s ``run_dir``: its newest complete checkpoint), a Hugging Face
  directory (``config.json`` with ``model_type`` ``clip``, ``siglip`` or ``siglip2``), or an open_clip
  directory (``open_clip_config.json`` beside its weights: CLIP, timm or Hugging Face towers, CoCa);
- an ``open_clip_config.json`` file (its directory is the model);
- a Hugging Face hub repo id, ``"hf-hub:ORG/NAME"`` (or a bare ``"ORG/NAME"`` that is not an existing
  path): its snapshot in the local Hugging Face cache (``polymodal.hub``), read as a directory.

``pretrained=`` may also be an open_clip pretrained tag for a registered open_clip architecture
(``create_model("clip-vit-b-32", pretrained="laion2b_s34b_b79k")``), found in the same cache.

**A registered name always means the registry**, even when the current directory holds a folder of
the same name: what ``create_model("clip-vit-tiny")`` builds must not depend on where it runs. To
load such a folder, spell it as a path (``"./clip-vit-tiny"``, an absolute path or a ``Path``).
A string that is not a registered name is a path.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from polymodal.errors import InputError

from .checkpoint import (
    CONFIG_NAME,
    FORMAT_NAME,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    WEIGHTS_NAME,
    CheckpointError,
    is_run_directory,
    load_state_dict_strict,
    newest_checkpoint,
    read_state_dict,
)
from .config import ENCODER_TYPES, ModelConfig, TokenizerConfig, model_config_from_file, read_json_mapping
from .convert import (
    HF_MODEL_TYPES,
    config_from_hf,
    config_from_open_clip,
    has_hf_tokenizer,
    hf_to_polymodal,
    looks_like_hf_clip,
    looks_like_open_clip,
    open_clip_to_polymodal,
    read_hf_preprocess,
)
from .hub import HUB_PREFIX, ModelNotFoundError, hub_repo_of, open_clip_pretrained, snapshot_of
from .model import build_model
from .registry import get_model_config, list_models

__all__ = [
    "REFERENCE_KINDS",
    "ModelReference",
    "apply_overrides",
    "build_reference",
    "load_pretrained",
    "locate_model",
    "parse_reference",
    "resolve_model",
]

REFERENCE_KINDS = ("config", "registered", "polymodal", "run", "hf", "open_clip")

FOREIGN_WEIGHTS = (
    "pytorch_model.bin",
    OPEN_CLIP_WEIGHTS,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


@dataclass(frozen=True)
class ModelReference:
    """What a reference names, before anything is built.

    Attributes:
        kind: one of ``REFERENCE_KINDS``.
        config: the architecture (from the registry, the reference itself, or the files).
        directory: where the weights are (``None`` for a registered name or a config); for a
            training run, its newest complete checkpoint.
        source: the reference as given, for messages.
        hub_repo: the Hugging Face repo id when the directory is a snapshot in the local hub cache.
    """

    kind: str
    config: ModelConfig
    directory: Path | None
    source: str
    hub_repo: str | None = None

    @property
    def has_weights(self) -> bool:
        return self.directory is not None

    def check_weights(
        self, pretrained: object, *, require: bool = True, name: str | None = None, option: str = "pretrained="
    ) -> Path | str | os.PathLike | None:
        """The one rule for where weights come from: a directory brings its own, so ``pretrained`` must be
        unset; a registered name or a config has none, so (with ``require``) ``pretrained`` must be given,
        since random weights would give predictions that look real and mean nothing.

        Args:
            pretrained: the separately given weights, or ``None``.
            require: refuse a reference that would end with random weights.
            name: how the caller's user wrote the reference (default: the reference itself, quoted).
            option: how that user gives weights (``--pretrained FILE``, ``task_args.teacher_pretrained``).

        Returns:
            Where the weights are: the reference's directory, ``pretrained``, or ``None`` (random weights).

        Raises:
            InputError: naming the reference and the option to drop or to give.
        """
        name = name or repr(self.source)
        if self.has_weights and pretrained is not None:
            raise InputError(f"{name} is a {self.kind} model directory with its own weights; drop {option}")
        if require and not self.has_weights and pretrained is None:
            what = "a model config" if self.kind == "config" else "a registered architecture"
            raise InputError(
                f"{name} is {what} with random weights; give its weights with {option}, "
                "or pass a directory written by save_pretrained or 'polymodal train' (such as runs/demo)"
            )
        return self.directory if self.has_weights else pretrained


def parse_reference(ref: str | os.PathLike | ModelConfig | ModelReference) -> ModelReference:
    """Decide what ``ref`` names and read its config (not its weights); see the module docstring.

    Raises:
        InputError: an unknown name or a path that does not exist (``FileNotFoundError`` for the
            latter, as the standard library would).
        CheckpointError: a file or directory that holds no model polymodal can read.
    """
    if isinstance(ref, ModelReference):
        return ref
    if isinstance(ref, ModelConfig):
        return ModelReference("config", ref, None, ref.name)
    if isinstance(ref, str) and ref in list_models():
        return ModelReference("registered", get_model_config(ref), None, ref)
    path = locate_model(ref)
    if is_run_directory(ref):
        return ModelReference("run", model_config_from_file(path / CONFIG_NAME), path, str(ref))
    reference = _read_directory(path, str(ref))
    if hub_repo_of(ref) is not None:
        reference = dataclasses.replace(reference, hub_repo=hub_repo_of(ref))
    return reference


def locate_model(ref: str | os.PathLike) -> Path | str:
    """Where the model ``ref`` names is, without reading it: a registered name as given, else the
    directory holding the model (for a training run, its newest complete checkpoint).

    Raises:
        InputError: a string that is neither a registered name nor an existing path.
        FileNotFoundError: a path that does not exist.
        CheckpointError: a file that is not an ``open_clip_config.json``, or a run without a complete checkpoint.
    """
    if isinstance(ref, str) and ref in list_models():
        return ref
    if hub_repo_of(ref) is not None:
        return snapshot_of(ref, not_a_path=not str(ref).startswith(HUB_PREFIX))
    path = Path(ref)
    if not path.exists():
        if isinstance(ref, str) and not _spelled_as_path(ref):
            raise ModelNotFoundError(
                f"unknown model {ref!r}; registered models are {list_models()} (and no directory of that name exists)"
            )
        raise ModelNotFoundError(
            f"{str(ref)!r} does not exist; expected a saved model or training run directory, a Hugging Face "
            "CLIP directory or an open_clip directory"
        )
    if path.is_file():
        if path.name == OPEN_CLIP_CONFIG:
            return path.parent
        raise CheckpointError(
            f"{str(path)!r} is a file; a single weights file does not say which architecture "
            "it holds: use create_model(NAME, pretrained=PATH)"
        )
    if is_run_directory(path):
        return newest_checkpoint(path)
    if not (path / CONFIG_NAME).is_file() and not (path / OPEN_CLIP_CONFIG).is_file():
        raise CheckpointError(
            f"{str(path)!r} has no {CONFIG_NAME}; expected a directory written by save_pretrained() or "
            f"'polymodal train', a Hugging Face CLIP model directory, or an open_clip directory ({OPEN_CLIP_CONFIG})"
        )
    return path


def _spelled_as_path(ref: str) -> bool:
    return os.sep in ref or "/" in ref or ref.startswith((".", "~")) or ref.endswith(".json")


def _read_directory(path: Path, source: str) -> ModelReference:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        if (path / OPEN_CLIP_CONFIG).is_file():
            data = read_json_mapping(path / OPEN_CLIP_CONFIG)
            config = config_from_open_clip(data, name=path.name, preprocess=data.get("preprocess_cfg"))
            return ModelReference("open_clip", config, path, source)
        raise CheckpointError(
            f"{str(path)!r} has no {CONFIG_NAME}; expected a directory written by "
            "save_pretrained() or a Hugging Face CLIP model directory"
        )
    data = read_json_mapping(config_path)
    if data.get("format") == FORMAT_NAME:
        return ModelReference("polymodal", model_config_from_file(config_path, data), path, source)
    if data.get("model_type") in HF_MODEL_TYPES:
        config = config_from_hf(data, name=path.name)
        preprocess = read_hf_preprocess(path, config.preprocess)
        if preprocess is not None:
            config.preprocess = preprocess
        if has_hf_tokenizer(path):
            length = config.input_spec("text").context_length
            config.tokenizer = TokenizerConfig("hf", length, str(path.resolve()))
        return ModelReference("hf", config, path, source)
    raise CheckpointError(
        f"{str(config_path)!r} is neither a polymodal config (format '{FORMAT_NAME}') nor a "
        f"Hugging Face config of model_type {' / '.join(HF_MODEL_TYPES)}; got model_type {data.get('model_type')!r}"
    )


def resolve_model(
    ref: str | os.PathLike | ModelConfig | ModelReference,
    *,
    pretrained: str | os.PathLike | None = None,
    device=None,
    dtype=None,
    require_weights: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build the model ``ref`` names (see the module docstring) and load its weights, strictly.

    Args:
        ref: a registered name, a ``ModelConfig``, a path, or what ``parse_reference`` made of one.
        pretrained: weights for a registered name or a config: a model directory, or a state-dict
            file with polymodal, open_clip or Hugging Face keys. A directory reference has its own.
        device: where to build the model.
        dtype: parameter dtype.
        require_weights: refuse a reference that would give random weights (a name without
            ``pretrained``): its predictions would be meaningless but look real.
        **overrides: config changes, see ``apply_overrides``; on a directory they must keep the
            architecture its weights were saved for (strict loading names any mismatch).
    """
    reference = parse_reference(ref)
    weights = reference.check_weights(pretrained, require=require_weights)
    return build_reference(reference, weights, device=device, dtype=dtype, **overrides)


def build_reference(
    reference: ModelReference, weights: str | os.PathLike | None, *, device=None, dtype=None, **overrides: Any
) -> nn.Module:
    """The model of a parsed ``reference`` with the ``weights`` its ``check_weights`` returned (``None``:
    random), loaded strictly. For callers that checked the weights themselves, with their own wording;
    ``resolve_model`` is parse, check, build."""
    source = _describe_source(reference, weights)
    if reference.kind == "registered" and _is_tag(weights):
        tag = open_clip_pretrained(reference.source, str(weights))
        weights, source = tag.path, tag.source
        overrides = {**tag.overrides, **overrides}
        if "preprocess" in tag.overrides and "preprocess" not in overrides:
            overrides["preprocess"] = {**reference.config.preprocess.__dict__, **tag.overrides["preprocess"]}
    config = apply_overrides(reference.config, overrides)  # a copy even without overrides: the model owns it
    model = build_model(config, device=device)
    if weights is not None:
        load_pretrained(model, weights)
    model.weights_source = source  # for the model card save_pretrained writes
    return model.to(dtype=dtype) if dtype is not None else model


def _is_tag(weights: object) -> bool:
    """A ``pretrained=`` string that names no file and is spelled as no path: an open_clip tag."""
    return isinstance(weights, str) and not Path(weights).exists() and not _spelled_as_path(weights)


def _describe_source(reference: ModelReference, weights: str | os.PathLike | None) -> str:
    """Where a model's weights come from, in words, for its model card."""
    if weights is None:
        return "random initialisation (no pretrained weights were loaded)"
    if reference.has_weights:
        kinds = {
            "polymodal": "a polymodal model directory",
            "run": "a polymodal training run's checkpoint",
            "hf": "a Hugging Face directory",
            "open_clip": "an open_clip directory",
        }
        where = kinds.get(reference.kind, "a directory")
        if reference.hub_repo is not None:
            return f"{where} from the local Hugging Face hub cache, {HUB_PREFIX}{reference.hub_repo} ({weights})"
        return f"{where}: {weights}"
    return f"weights file {weights}"


def apply_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Return a copy of ``config`` with overrides applied.

    ``overrides`` may set top-level config fields (``embed_dim=256``), merge constructor arguments into
    one tower (``image={"image_size": 96}``), or set ``act_layer`` / ``quick_gelu=True`` on every tower
    whose encoder takes an activation.
    """
    config = copy.deepcopy(config)
    fields = set(config.to_dict())
    for key, value in overrides.items():
        if key in config.towers:
            if not isinstance(value, dict):
                raise InputError(f"override {key}= must be a dict of {key} encoder arguments, got {value!r}")
            config.towers[key].args.update(value)
            if "image_size" in value and key == "image" and "preprocess" not in overrides:
                config.preprocess.image_size = value["image_size"]  # the transform must produce what the tower takes
            if "sample_rate" in value and key == "audio" and "preprocess" not in overrides:
                config.preprocess.sample_rate = value["sample_rate"]
        elif key in ("act_layer", "quick_gelu"):
            act = value if key == "act_layer" else ("quick_gelu" if value else "gelu")
            for tower in config.towers.values():
                if "act_layer" in inspect.signature(ENCODER_TYPES[tower.type]).parameters:
                    tower.args["act_layer"] = act
        elif key in fields and key != "towers":
            setattr(config, key, value)
        else:
            raise InputError(
                f"unknown override {key!r}; expected a config field {sorted(fields - {'towers'})}, "
                f"a tower name {sorted(config.towers)}, 'act_layer' or 'quick_gelu'"
            )
    return ModelConfig.from_dict(config.to_dict())


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights of any supported format into an existing model, strictly."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in (WEIGHTS_NAME, *FOREIGN_WEIGHTS) if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"directory {str(path)!r} has no weights file (looked for {WEIGHTS_NAME}, {', '.join(FOREIGN_WEIGHTS)})"
            )
        path = weights
    state = read_state_dict(path)
    if looks_like_hf_clip(state):
        state = hf_to_polymodal(state, model.config)
    elif looks_like_open_clip(state):
        if model.config is None or "image" not in model.config.towers:
            raise CheckpointError(f"{str(path)!r} is an open_clip CLIP checkpoint, which needs an image-text model")
        state = open_clip_to_polymodal(state, model.config)
    load_state_dict_strict(model, state, source=repr(str(path)))
