"""Training configuration: dataclasses loaded from YAML (``yaml.safe_load``) with ``key=value`` overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from polymodal.config import LoraConfig
from polymodal.errors import ConfigError

__all__ = [
    "DataSection",
    "DistributedSection",
    "ModelSection",
    "OptimSection",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_section",
    "parse_value",
    "read_yaml_mapping",
]


@dataclass
class ModelSection:
    """Which model to train.

    Args:
        name: registered model name (``polymodal list-models``) or a saved model directory.
        pretrained: weights to start from (any format ``create_model`` accepts).
        overrides: ``create_model`` overrides, e.g. ``{"image": {"patch_dropout": 0.5}}``.
        lock: towers to freeze, mapped to how many of their last layer groups stay trainable.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        compile: wrap the model in ``torch.compile``.
        lora: LoRA adapters on some towers (``polymodal.config.LoraConfig``: ``towers``, ``r``, ``alpha``,
            ``dropout``, ``targets``): those towers' weights freeze and only their adapters train; the run
            also writes the adapters alone to ``run_dir/adapter`` (``polymodal lora merge`` folds them in).
    """

    name: str = "clip-vit-tiny"
    pretrained: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    lock: dict[str, int] = field(default_factory=dict)
    grad_checkpointing: bool = False
    compile: bool = False
    lora: LoraConfig | None = None


# What the built-in data generates when data.train_size / data.eval_size are unset.
GENERATED_SIZES = {"train_size": 20000, "eval_size": 1000}


@dataclass
class DataSection:
    """Where pairs come from.

    Args:
        source: ``"shapes"`` / ``"tones"`` (built-in, generated on the fly), ``"csv"`` (an index file:
            CSV, TSV or JSONL) or ``"wds"`` (WebDataset shards).
        train: index path or shard URLs for ``csv`` / ``wds``.
        eval: held-out index path or shard URLs; the built-in data has its own held-out split.
        train_size: training pairs: how many the built-in data generates (unset: 20,000), or how
            many rows of an index file (``csv``) to keep, drawn at random (unset: all).
        eval_size: held-out pairs, likewise (unset: 1,000 generated, or every row of the index).
        image_key, audio_key, caption_key: column (or member) names.
        batch_size: global batch size, split evenly over ranks.
        num_workers: DataLoader worker processes per rank. The default, 0, loads in the training
            process: on a 2-core machine a worker competes with the compute threads and the demo
            runs about 20% slower with one.
        seed: data seed (generation, shuffling, augmentation).
        skip_budget: stop when more than this fraction of samples is bad.
        epoch_samples: samples per epoch for streamed WebDataset shards.
        augment: use the random training transform (otherwise the eval transform).
        builtin: extra arguments of the built-in data's generator, for both splits (e.g.
            ``{two_shape_share: 0.2, max_rotation: 30}`` for ``shapes``; see ``ShapesDataset`` and
            ``TonesDataset``).
        hard_negatives: wrong captions per training sample added to the text side of the loss
            (NegCLIP-style): generated for ``shapes`` (``hard_negative_captions``), read from the
            ``hard_negatives_key`` column of a ``csv`` index (a list of captions; in CSV / TSV as JSON)
            or field of each ``wds`` sample's ``.json`` member (a list of captions).
        hard_negatives_key: that column or field.
        group_by: a column, a field of the ``wds`` samples' ``.json`` (or built-in attribute, e.g.
            ``caption``) whose equal values make two samples of a batch positives of each other (the
            multi-positive loss); unset: each sample is its own.
    """

    source: str = "shapes"
    train: str | None = None
    eval: str | None = None
    train_size: int | None = None
    eval_size: int | None = None
    image_key: str = "image"
    audio_key: str = "audio"
    caption_key: str = "caption"
    batch_size: int = 128
    num_workers: int = 0
    seed: int = 0
    skip_budget: float = 0.1
    epoch_samples: int | None = None
    augment: bool = False
    builtin: dict[str, Any] = field(default_factory=dict)
    hard_negatives: int = 0
    hard_negatives_key: str = "hard_negatives"
    group_by: str | None = None

    def generated_size(self, name: str) -> int:
        """How many pairs the built-in data generates for ``name`` (``"train_size"`` or ``"eval_size"``)."""
        value = getattr(self, name)
        return GENERATED_SIZES[name] if value is None else value


@dataclass
class OptimSection:
    """AdamW, the schedule and the update rule.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (never applied to norms, biases, embeddings or the temperature).
        betas, eps: AdamW moments.
        warmup_steps: linear warm-up before the cosine decay.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        grad_clip: clip the global gradient norm (``None`` or 0: off).
        accum_steps: micro-batches per optimiser step; the contrastive (and distillation) loss still sees
            the whole batch.
        ema_decay: keep an exponential moving average of the weights (``None``: off).
        loss: ``"clip"`` (softmax InfoNCE) or ``"siglip"`` (sigmoid).
        local_loss: with ``clip``, each rank scores only its own rows against the global batch.
        loss_tile: compute the loss in ``loss_tile x loss_tile`` blocks, recomputed in the backward pass,
            so its memory is linear in the batch (``polymodal.fusion.tiled``); ``null``: the whole logit
            matrix at once; ``auto``: tiled when a matrix has more than 4096 x 4096 logits.
        max_nonfinite: stop after this many consecutive steps with a non-finite loss or gradient.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    ema_decay: float | None = None
    loss: str = "clip"
    local_loss: bool = False
    loss_tile: int | str | None = "auto"
    max_nonfinite: int = 5


@dataclass
class DistributedSection:
    """How a run under torchrun shares the work between its processes (a single process ignores it).

    Args:
        strategy: ``"ddp"`` (DistributedDataParallel: every process holds the whole model, optimiser
            state and gradients) or ``"fsdp"`` (FSDP2: each encoder block's weights, gradients and
            optimiser state are sharded over the processes and gathered block by block; checkpoints
            stay whole state dicts). ``fsdp`` needs torchrun with 2 or more processes.
    """

    strategy: str = "ddp"


@dataclass
class TrainConfig:
    """A whole training run.

    Args:
        run_dir: where checkpoints, metrics, the resolved config, the report and plots go.
        steps: optimiser steps to run.
        seed: model initialisation and global RNG seed.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with a gradient scaler; CUDA only).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for torch (``None``: torch's default).
        log_every: steps between metric lines.
        eval_every: steps between evaluations during training (0: only the full one at the end); they
            leave the training trajectory unchanged.
        eval_subset: held-out samples those evaluations use (the first ones; 0: all). The final
            evaluation always uses the whole held-out split.
        save_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        tensorboard: also write TensorBoard scalars.
        progress: show a tqdm progress bar; without it a line is logged every ``log_every`` steps.
        resume: ``"latest"`` (newest complete checkpoint in run_dir, or a fresh start when there is none),
            a checkpoint directory, or ``None``.
        overwrite: a fresh run may delete the outputs of an earlier run in ``run_dir``, or write into a
            folder that holds other files (a run otherwise writes only into an empty folder or its own
            earlier run).
        task: what is trained (``polymodal.train.tasks``): ``"contrastive"`` (the default),
            ``"classify"``, ``"caption"`` or ``"distill"``.
        task_args: the task's own options (see its class docstring); checked by the task.
    """

    run_dir: str = "runs/train"
    steps: int = 1000
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_subset: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    resume: str | None = None
    overwrite: bool = False
    task: str = "contrastive"
    task_args: dict[str, Any] = field(default_factory=dict)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def __post_init__(self) -> None:
        sections = {
            "model": ModelSection,
            "data": DataSection,
            "optim": OptimSection,
            "distributed": DistributedSection,
        }
        for name, kind in sections.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, parse_section(kind, value, name))
        self.validate()

    def validate(self) -> None:
        """Check every value's range before any of it reaches torch; raises ``ConfigError`` naming the key."""
        o, d, fsdp = self.optim, self.data, self.distributed.strategy == "fsdp"
        checks = [
            (
                self.precision in ("fp32", "bf16", "fp16"),
                f"precision must be fp32, bf16 or fp16, got {self.precision!r}",
            ),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.steps > 0, f"steps must be positive, got {self.steps}"),
            (self.threads is None or self.threads > 0, f"threads must be positive or null, got {self.threads}"),
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}"),
            (self.eval_subset >= 0, f"eval_subset must be >= 0 (0: the whole held-out split), got {self.eval_subset}"),
            (self.save_every >= 0, f"save_every must be >= 0 (0: only at the end), got {self.save_every}"),
            (self.keep_checkpoints > 0, f"keep_checkpoints must be positive, got {self.keep_checkpoints}"),
            (
                isinstance(self.task, str) and bool(self.task),
                f"task must name a trainer task, got {self.task!r}",
            ),
            (
                isinstance(self.task_args, dict),
                f"task_args must be a mapping, got {type(self.task_args).__name__}",
            ),
            (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
            (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
            (all(0 <= b < 1 for b in o.betas), f"optim.betas must lie in [0, 1), got {list(o.betas)}"),
            (o.eps > 0, f"optim.eps must be positive, got {o.eps}"),
            (o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
            (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}"),
            (
                o.grad_clip is None or o.grad_clip >= 0,
                f"optim.grad_clip must be >= 0 or null (0 and null: off), got {o.grad_clip}",
            ),
            (o.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {o.accum_steps}"),
            (
                o.ema_decay is None or 0 < o.ema_decay < 1,
                f"optim.ema_decay must lie in (0, 1) or be null, got {o.ema_decay}",
            ),
            (o.loss in ("clip", "siglip"), f"optim.loss must be clip or siglip, got {o.loss!r}"),
            (d.hard_negatives >= 0, f"data.hard_negatives must be >= 0, got {d.hard_negatives}"),
            (
                # the generated tones have no wrong captions to give
                d.hard_negatives == 0 or d.source in ("shapes", "csv", "wds"),
                f"data.hard_negatives needs data.source shapes (generated), csv (a {d.hard_negatives_key!r} "
                f"column) or wds (a {d.hard_negatives_key!r} field in each sample's .json); "
                f"got data.source={d.source}",
            ),
            (
                o.loss_tile in ("auto", None)
                or (isinstance(o.loss_tile, int) and not isinstance(o.loss_tile, bool) and o.loss_tile > 0),
                f"optim.loss_tile must be auto, null or a positive integer (e.g. 4096), got {o.loss_tile!r}",
            ),
            (o.max_nonfinite >= 1, f"optim.max_nonfinite must be >= 1, got {o.max_nonfinite}"),
            (
                d.source in ("shapes", "tones", "csv", "wds"),
                f"data.source must be shapes, tones, csv or wds, got {d.source!r}",
            ),
            (
                d.source in ("shapes", "tones") or d.train,
                f"data.train (an index file or shard URLs) is required for data.source={d.source!r}",
            ),
            (d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}"),
            (d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
            (d.train_size is None or d.train_size > 0, f"data.train_size must be positive, got {d.train_size}"),
            (d.eval_size is None or d.eval_size >= 0, f"data.eval_size must be >= 0, got {d.eval_size}"),
            (0 <= d.skip_budget <= 1, f"data.skip_budget must lie in [0, 1], got {d.skip_budget}"),
            (
                d.epoch_samples is None or d.epoch_samples > 0,
                f"data.epoch_samples must be positive or null, got {d.epoch_samples}",
            ),
            (
                not d.builtin or d.source in ("shapes", "tones"),
                f"data.builtin sets options of the built-in data, but data.source is {d.source!r}",
            ),
            (
                self.distributed.strategy in ("ddp", "fsdp"),
                f"distributed.strategy must be ddp or fsdp, got {self.distributed.strategy!r}",
            ),
            (
                # the fp16 gradient scaler would look for overflows in each rank's shard of the gradients
                # alone, and the ranks' scales (and which steps they skip) would drift apart
                not (fsdp and self.precision == "fp16"),
                "precision fp16 does not go with distributed.strategy fsdp (its gradient scaler sees one shard "
                "of the gradients per rank); use precision bf16",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return parse_section(cls, data, "")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_section(kind: type, data: Any, where: str) -> Any:
    """The dataclass ``kind`` built from a mapping (a config section or a task's ``task_args``).

    The one parser of options. Every key must be a field of ``kind`` and every value must fit the
    field's type hint (numbers written as strings, e.g. ``3e-4``, become floats; nested dataclasses
    are parsed the same way). ``where`` is the section's dotted name (``""`` for a whole config);
    ``ConfigError`` names ``where.key`` and what was expected.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'the config'}; expected some of {sorted(names)}")
    hints = get_type_hints(kind)
    return kind(**{key: _coerce(value, hints[key], f"{where}.{key}" if where else key) for key, value in data.items()})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a field's type, e.g. the string "3e-4" to a float."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else parse_section(hint, value, where)
    if hint is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")


def parse_value(text: str) -> Any:
    """A ``key=value`` value from the command line, read as a YAML scalar or list: ``3``, ``0.1``, ``true``,
    ``null``, ``[1, 2]``; anything else (including text YAML cannot read) is the string itself."""
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (dotted paths, YAML values) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = parse_value(raw)
    return data


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML recipe holds (empty file: ``{}``); ``ConfigError`` names the file and the line of
    a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r} is not a UTF-8 text file; expected a YAML recipe") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (``None``: defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {} if path is None else read_yaml_mapping(path)
    try:
        return TrainConfig.from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{str(path)!r}: {e}") from None
