"""The classification task (``task: classify``): a classifier over towers of a trained model, fine-tuned or probed.

The base model is ``model.name``: a saved model directory, a training run directory (its newest
complete checkpoint, e.g. ``runs/demo``), a checkpoint directory, or a registered name (with
``model.pretrained`` weights, or random ones to train from scratch). Its towers named in
``task_args.towers`` are copied into a ``LateFusionClassifier`` (one tower: a linear head on its
pooled output; several: a fusion module, then the head), which is what trains and what the
checkpoints hold (``polymodal.from_pretrained`` loads it, class names included).

``task_args`` (all optional but ``label_key`` on non-built-in data):
    towers: the towers to use, e.g. ``[image]`` (default: image, else audio) or ``[image, text]``.
    label_key: the ``meta`` entry holding each sample's class (default ``shape`` for shapes data,
        ``waveform`` for tones; ``verdict`` for ``dataset: shape_claims``).
    classes: the class names (default: every value ``label_key`` takes in the built-in data).
    dataset: ``labels`` (samples of ``data.source`` labelled by ``label_key``) or ``shape_claims``
        (image + claim pairs, ``polymodal.datasets.shape_claims``; needs ``data.source: shapes``).
    mode: ``finetune`` (towers and head train) or ``probe`` (towers frozen; ``polymodal finetune``
        then fits the head on cached features, see ``run_linear_probe``).
    head_lr, encoder_lr: learning rates of head (and fusion) and of the towers; default ``optim.lr``.
    label_smoothing: cross-entropy label smoothing.
    fusion: ``concat``, ``attention`` or ``cross_attention`` (several towers; default ``concat``).
    fusion_args: the fusion module's arguments (its ``input_dims`` are filled in).
    zero_shot: also report the base model's zero-shot accuracy on the same held-out samples when
        it can classify ``label_key`` zero-shot (default ``true``).
    probe: the linear probe's options: ``weight_decay`` (fixed) or ``weight_decays`` (searched on
        the validation split), ``val`` (``heldout``, the default for built-in data: ``val_size`` extra
        samples drawn like the held-out split, disjoint from it; ``train``, the default otherwise: a
        share of the training samples; ``none``),
        ``val_size``, ``method`` (``lbfgs`` or ``adam``), ``max_iter``, ``epochs``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from polymodal.checkpoint import CheckpointError
from polymodal.config import (
    ENCODER_TYPES,
    FUSION_TYPES,
    ComponentConfig,
    ModelConfig,
    build_component,
    build_encoder,
    query_modality_of,
    validate_component,
)
from polymodal.datasets import Batch
from polymodal.errors import InputError
from polymodal.model import LateFusionClassifier
from polymodal.resolver import locate_model, parse_reference, resolve_model

from .config import parse_section
from .data import RunData, build_datasets, make_loader
from .tasks import TrainTask, finish_model, register_task

log = logging.getLogger("polymodal.train")

FUSIONS = ("concat", "attention", "cross_attention")
MODES = ("finetune", "probe")
DATASETS = ("labels", "shape_claims")
PROBE_VALS = ("heldout", "train", "none")


def builtin_classes(source: str, dataset: str = "labels") -> dict[str, list[str]]:
    """Label keys of the built-in data and the classes each takes."""
    from polymodal import datasets as pd
    from polymodal.datasets.shape_claims import VERDICTS

    if dataset == "shape_claims":
        return {"verdict": list(VERDICTS), "claim_kind": ["true", "wrong shape", "wrong colour"]}
    if source == "shapes":
        from polymodal.datasets.synthetic_shapes import POSITIONS, SIZES

        return {"shape": list(pd.SHAPES), "colour": list(pd.COLOURS), "size": list(SIZES), "position": list(POSITIONS)}
    if source == "tones":
        return {"waveform": list(pd.TONE_WAVEFORMS), "pitch": list(pd.TONE_PITCHES), "pattern": list(pd.TONE_PATTERNS)}
    return {}


@dataclass
class ProbeOptions:
    """See the module docstring (``task_args.probe``)."""

    weight_decay: float | None = None
    weight_decays: list[float] | None = None
    val: str | None = None  # heldout for the built-in data, else train
    val_size: int = 1000
    method: str = "lbfgs"
    max_iter: int = 300
    epochs: int = 100


@dataclass
class ClassifyOptions:
    """``task_args`` of the classify task, checked; see the module docstring."""

    towers: list[str] | None = None
    label_key: str | None = None
    classes: list[str] | None = None
    dataset: str = "labels"
    mode: str = "finetune"
    head_lr: float | None = None
    encoder_lr: float | None = None
    label_smoothing: float = 0.0
    fusion: str = "concat"
    fusion_args: dict[str, Any] = field(default_factory=dict)
    zero_shot: bool = True
    probe: ProbeOptions = field(default_factory=ProbeOptions)

    @classmethod
    def from_args(cls, args: dict[str, Any], source: str) -> ClassifyOptions:
        """Parsed by the trainer's one option parser (``parse_section``), then checked against ``source``."""
        args = {k: v for k, v in args.items() if not (k == "probe" and v is None)}  # an empty ``probe:``
        opts = parse_section(cls, args, "task_args")
        opts.validate(source)
        return opts

    def validate(self, source: str) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"task classify: {message}")

        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(
            self.dataset != "shape_claims" or source == "shapes",
            f"dataset shape_claims is built from the shapes data; set data.source=shapes (got {source!r})",
        )
        need(self.fusion in FUSIONS, f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        need(isinstance(self.fusion_args, dict), f"fusion_args must be a mapping, got {self.fusion_args!r}")
        if self.towers is not None:
            need(
                isinstance(self.towers, list) and bool(self.towers) and all(isinstance(t, str) for t in self.towers),
                f"towers must be a non-empty list of tower names such as [image], got {self.towers!r}",
            )
            need(len(set(self.towers)) == len(self.towers), f"towers lists a tower twice: {self.towers}")
        for name in ("head_lr", "encoder_lr"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and value > 0), f"{name} must be > 0, got {value!r}")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.classes is not None:
            need(
                isinstance(self.classes, list) and len(self.classes) > 0,
                f"classes must be a non-empty list of class names, got {self.classes!r}",
            )
            need(
                all(isinstance(c, str) and c.strip() for c in self.classes),
                f"classes must be non-empty strings, got {self.classes!r}",
            )
            need(len(set(self.classes)) == len(self.classes), f"classes lists a class twice: {self.classes}")
            need(len(self.classes) >= 2, f"a classifier needs at least 2 classes, got {self.classes}")
        builtin = builtin_classes(source, self.dataset)
        if self.label_key is None:
            need(bool(builtin), f"label_key is required for data.source={source!r} (the meta entry with the class)")
            self.label_key = next(iter(builtin)) if self.dataset == "labels" else "verdict"
            if source == "shapes" and self.dataset == "labels":
                self.label_key = "shape"
        if builtin:
            need(
                self.label_key in builtin,
                f"unknown label_key {self.label_key!r} for the built-in {source} data"
                f"{' (shape_claims)' if self.dataset == 'shape_claims' else ''}; expected one of {sorted(builtin)}",
            )
            if self.classes is None:
                self.classes = builtin[self.label_key]
            else:
                extra = sorted(set(self.classes) - set(builtin[self.label_key]))
                need(
                    not extra,
                    f"classes {extra} never occur as {self.label_key!r} in the {source} data; "
                    f"its values are {builtin[self.label_key]}",
                )
        need(self.classes is not None, f"classes is required for data.source={source!r}: list the class names")
        p = self.probe
        if p.val is None:
            p.val = "heldout" if source in ("shapes", "tones") else "train"
        need(p.val in PROBE_VALS, f"probe.val must be one of {PROBE_VALS}, got {p.val!r}")
        need(p.val != "heldout" or source in ("shapes", "tones"), "probe.val=heldout needs built-in data; use train")
        need(isinstance(p.val_size, int) and p.val_size >= 1, f"probe.val_size must be >= 1, got {p.val_size!r}")
        need(p.method in ("lbfgs", "adam"), f"probe.method must be lbfgs or adam, got {p.method!r}")
        need(p.weight_decay is None or p.weight_decay >= 0, f"probe.weight_decay must be >= 0, got {p.weight_decay}")
        if p.weight_decays is not None:
            need(
                isinstance(p.weight_decays, list) and p.weight_decays and all(w >= 0 for w in p.weight_decays),
                f"probe.weight_decays must be a non-empty list of values >= 0, got {p.weight_decays!r}",
            )


def resolve_base(spec: str) -> str:
    """The directory (or registered name) a base model spec points to, as ``polymodal.resolver`` decides:
    a training run resolves to its newest complete checkpoint."""
    try:
        return str(locate_model(spec))
    except CheckpointError:
        if Path(spec).is_file():
            raise ValueError(
                f"base model {spec!r} is a file; pass a model directory or a registered model name"
            ) from None
        raise FileNotFoundError(
            f"base model {spec!r} is a directory without config.json and without complete checkpoints; expected a "
            "saved model directory, a checkpoint directory, or a training run directory such as runs/demo "
            "(run 'make demo' to create it)"
        ) from None
    except (FileNotFoundError, InputError):
        raise FileNotFoundError(
            f"base model {spec!r} does not exist: expected a saved model directory, a training run directory "
            "(e.g. runs/demo, written by 'make demo') or a registered model name (see 'polymodal list-models')"
        ) from None


def load_base(cfg, device: torch.device) -> nn.Module:
    """The base model of a classify run, in eval mode (its towers are copied, never trained in place)."""
    resolve_base(cfg.model.name)  # the trainer's messages for a missing base
    reference = parse_reference(cfg.model.name)
    if reference.has_weights and (cfg.model.pretrained is not None or cfg.model.overrides):
        raise ValueError(
            f"model.name {cfg.model.name!r} is a saved model; model.pretrained and model.overrides apply only "
            "to registered names"
        )
    if not reference.has_weights and cfg.model.pretrained is None:
        log.warning(
            "base model %s has random weights (no model.pretrained): the classifier trains from scratch", cfg.model.name
        )
    return resolve_model(reference, pretrained=cfg.model.pretrained, device=device, **cfg.model.overrides).eval()


def _fusion_config(opts: ClassifyOptions, dims: dict[str, int]) -> ComponentConfig:
    args = dict(opts.fusion_args)
    if "input_dims" in args:
        raise ValueError("task classify: fusion_args.input_dims is filled in from the towers; leave it out")
    args["input_dims"] = dims
    if opts.fusion == "attention":
        args.setdefault("dim", max(dims.values()))
    elif opts.fusion == "cross_attention":
        if len(dims) != 2:
            raise ValueError(f"task classify: cross_attention fuses exactly two towers, got {sorted(dims)}")
        args.setdefault("query_modality", query_modality_of(dims) or sorted(dims)[0])
        args.setdefault("context_modality", next(m for m in dims if m != args["query_modality"]))
        args.setdefault("dim", dims[args["query_modality"]])
        args.setdefault("heads", 4 if args["dim"] % 4 == 0 else 1)
        args.setdefault("layers", 1)
    return ComponentConfig(opts.fusion, args)


def build_classifier(base: nn.Module, opts: ClassifyOptions, towers: list[str], device=None) -> LateFusionClassifier:
    """A ``LateFusionClassifier`` over copies of ``base``'s ``towers`` (weights included) with a fresh head."""
    config: ModelConfig = base.config
    token_fusion = opts.fusion == "cross_attention" and len(towers) > 1
    tower_cfgs = {m: copy.deepcopy(config.towers[m]) for m in towers}
    for tower_cfg in tower_cfgs.values():
        params = inspect.signature(ENCODER_TYPES[tower_cfg.type]).parameters
        if token_fusion and "output_dim" in params:
            tower_cfg.args["output_dim"] = None  # token fusion reads forward_features; no unused projection
    encoders = {m: build_encoder(c, device=device) for m, c in tower_cfgs.items()}
    for m, encoder in encoders.items():
        state = base.towers[m].state_dict()
        wanted = encoder.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"the base model's {m!r} tower lacks weights {missing[:5]} the classifier's tower needs")
        encoder.load_state_dict({k: state[k] for k in wanted})
    if len(towers) == 1:
        m = towers[0]
        dims = {m: encoders[m].output_dim}
        # One tower: the identity on its pooled vector, or the same projection the fused classifier would have.
        args = dict(opts.fusion_args) if opts.fusion == "concat" else {}
        fusion_cfg = ComponentConfig("concat", {**args, "input_dims": dims})
    else:
        dims = {m: (e.width if token_fusion else e.output_dim) for m, e in encoders.items()}
        fusion_cfg = _fusion_config(opts, dims)
    model_cfg = ModelConfig(
        name=f"{config.name}-{opts.label_key}-classifier",
        towers=tower_cfgs,
        embed_dim=config.embed_dim,
        kind="late_fusion",
        fusion=fusion_cfg,
        num_classes=len(opts.classes),
        class_names=list(opts.classes),
        tokenizer=config.tokenizer if "text" in towers else None,
        preprocess=copy.deepcopy(config.preprocess),
    )
    fusion = build_component_for(fusion_cfg, device)
    head = nn.Linear(fusion.output_dim, len(opts.classes), device=device)
    return LateFusionClassifier(encoders, fusion, head, model_cfg)


def build_component_for(cfg: ComponentConfig, device) -> nn.Module:
    validate_component(cfg, FUSION_TYPES, "task_args.fusion")
    return build_component(cfg, FUSION_TYPES, device=device)


def claims_datasets(cfg, base_config: ModelConfig, tokenizer, train_tf, eval_tf) -> tuple[Dataset, Dataset]:
    """The train and held-out splits of ``dataset: shape_claims`` for a base model's towers."""
    from polymodal.datasets.shape_claims import ShapeClaimsDataset

    allowed = set(inspect.signature(ShapeClaimsDataset).parameters) - {"split", "n", "seed", "transform", "tokenizer"}
    unknown = sorted(set(cfg.data.builtin) - allowed)
    if unknown:
        raise ValueError(
            f"data.builtin has unknown options {unknown} for shape claims; expected some of {sorted(allowed)}"
        )
    options = {"tokenizer": tokenizer, **cfg.data.builtin}
    if "image" in base_config.towers:  # images drawn at the size the tower takes; else the generator's own
        height, width = base_config.input_spec("image").image_size
        options.setdefault("image_size", height if height == width else (height, width))
    train = ShapeClaimsDataset(
        "train", cfg.data.generated_size("train_size"), cfg.data.seed, transform=train_tf, **options
    )
    held = ShapeClaimsDataset(
        "heldout", cfg.data.generated_size("eval_size"), cfg.data.seed, transform=eval_tf, **options
    )
    return train, held


@register_task
class ClassifyTask(TrainTask):
    """Train a classifier over towers of a base model; see the module docstring for ``task_args``."""

    name = "classify"
    output_names = ("confusion.png",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.opts = ClassifyOptions.from_args(cfg.task_args, cfg.data.source)
        resolve_base(cfg.model.name)  # a missing base fails before anything is built or written
        self.base: nn.Module | None = None
        self.towers: list[str] = []
        self.labels = None
        self.zero_shot_prompts: tuple[list[str], list[str]] | None = None
        self._zero_shot_metrics: dict[str, float] | None = None

    # ------------------------------------------------------------------ model and data

    def build_model(self, device: torch.device) -> nn.Module:
        from polymodal.tasks import BatchLabels

        base = load_base(self.cfg, device)
        if getattr(base, "config", None) is None or not hasattr(base, "towers"):
            raise ValueError(f"base model {self.cfg.model.name!r} has no towers to classify with")
        available = list(base.towers)
        towers = self.opts.towers or [query_modality_of(available) or available[0]]
        missing = [m for m in towers if m not in available]
        if missing:
            raise ValueError(f"task classify: base model has no {missing} tower(s); it has {available}")
        self.base, self.towers = base, towers
        model = build_classifier(base, self.opts, towers, device)
        if self.opts.mode == "probe":
            for tower in model.towers.values():
                tower.lock()
        for modality, unlocked in self.cfg.model.lock.items():
            if modality not in model.towers:
                raise ValueError(f"model.lock names {modality!r}, which is not one of the classifier's towers {towers}")
            model.towers[modality].lock(unlocked_layers=unlocked)
        finish_model(model, self.cfg.model)
        self.labels = BatchLabels(self.opts.classes, self.opts.label_key, towers)
        return model

    def build_data(self, model: nn.Module) -> RunData:
        from polymodal.factory import get_preprocess, get_tokenizer

        base_config = self.base.config
        tokenizer = get_tokenizer(self.base) if base_config.tokenizer is not None else None
        augment = self.cfg.data.augment and self.opts.mode == "finetune"
        image = "image" in base_config.towers
        train_tf = get_preprocess(self.base, "image", is_train=augment) if image else None
        eval_tf = get_preprocess(self.base, "image", is_train=False) if image else None
        if self.opts.dataset == "shape_claims":
            train, held = claims_datasets(self.cfg, base_config, tokenizer, train_tf, eval_tf)
            data = RunData(train, held, tuple(self.towers), {}, None)
        else:
            data = build_datasets(self.cfg.data, base_config, tokenizer, train_tf, eval_tf)
            data = RunData(data.train, data.eval, tuple(self.towers), data.zero_shot, data.unseen_key)
        self._check_label_key(data.train)
        prompts = data.zero_shot.get(self.opts.label_key)
        if (
            self.opts.zero_shot
            and prompts is not None
            and list(prompts[0]) == list(self.opts.classes)
            and len(self.towers) == 1
            and hasattr(self.base, "alignment")
            and "text" in self.base.towers
        ):
            self.zero_shot_prompts = prompts
        return data

    def _check_label_key(self, dataset: Dataset) -> None:
        """Fail early, naming the key, when the samples carry no ``label_key`` in their meta."""
        if isinstance(dataset, torch.utils.data.IterableDataset):
            return  # streamed shards: checked batch by batch
        meta = dataset[0].get("meta", {}) if len(dataset) else {}
        if self.opts.label_key not in meta:
            raise ValueError(
                f"task classify: the samples have no {self.opts.label_key!r} in their meta; "
                f"they have {sorted(meta)} (set task_args.label_key)"
            )

    # ------------------------------------------------------------------ training

    def lr_scales(self, model: nn.Module) -> dict[str, float]:
        lr = self.cfg.optim.lr
        head = (self.opts.head_lr or lr) / lr
        encoder = (self.opts.encoder_lr or lr) / lr
        return {"towers.": encoder, "fusion.": head, "head.": head}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, labels = self.labels(batch)
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=self.opts.label_smoothing)

    # ------------------------------------------------------------------ evaluation and outputs

    def eval_loader(self, data: RunData):
        return make_loader(data.eval, 256, 0)

    def zero_shot_metrics(self, data: RunData, device: torch.device) -> dict[str, float]:
        """The base model's zero-shot accuracy on the held-out samples (computed once: the base never changes)."""
        if self.zero_shot_prompts is None or data.eval is None:
            return {}
        if self._zero_shot_metrics is None:
            from polymodal.factory import get_tokenizer
            from polymodal.tasks import BatchLabels, ZeroShotClassifier, default_top_k, evaluate_zero_shot

            (modality,) = self.towers
            classes, templates = self.zero_shot_prompts
            classifier = ZeroShotClassifier(self.base, get_tokenizer(self.base), classes, templates, modality=modality)
            result = evaluate_zero_shot(
                self.base,
                self.eval_loader(data),
                classifier,
                label_fn=BatchLabels(classes, self.opts.label_key, modality),
                modality=modality,
                top_k=default_top_k(len(classes)),
                device=device,
                progress=False,
            )
            self._zero_shot_metrics = {f"zeroshot/{k}": v for k, v in result.to_dict().items()}
        return dict(self._zero_shot_metrics)

    def evaluate(self, model: nn.Module, data: RunData, device: torch.device) -> tuple[dict[str, float], dict]:
        from polymodal.tasks import evaluate_classifier

        if data.eval is None:
            return {}, {}
        result = evaluate_classifier(
            model, self.eval_loader(data), self.opts.classes, label_fn=self.labels, device=device, progress=False
        )
        return self.metrics_of(result, data, device), {"confusion": result.confusion}

    def metrics_of(self, result, data: RunData, device: torch.device) -> dict[str, float]:
        metrics = {f"classify/{k}": v for k, v in result.to_dict().items()}
        metrics.update({f"classify/per_class/{name}": acc for name, acc in result.per_class.items()})
        metrics.update(self.zero_shot_metrics(data, device))
        return metrics

    def write_outputs(
        self, run_dir: Path, report: dict[str, Any], rows: list[dict], extras: dict, data: RunData, model: nn.Module
    ) -> None:
        from polymodal.tasks import plot_confusion

        if extras.get("confusion") is not None:
            title = f"{self.opts.mode}: {'+'.join(self.towers)} by {self.opts.label_key}"
            plot_confusion(
                extras["confusion"], self.opts.classes, run_dir / "confusion.png", title=title, overwrite=True
            )

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        return classify_summary(report.get("eval", {}), self.opts, self.towers, report.get("probe"))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def classify_summary(
    ev: dict[str, float], opts: ClassifyOptions, towers: list[str], probe: dict | None = None
) -> list[str]:
    """Accuracy lines: the classifier's top-1 (top-5), per-class accuracy, and zero-shot on the same samples."""
    if "classify/top1" not in ev:
        return []
    what = "linear probe" if opts.mode == "probe" else "fine-tuned classifier"
    parts = [f"top-1 {_pct(ev['classify/top1'])}"]
    if "classify/top5" in ev:
        parts.append(f"top-5 {_pct(ev['classify/top5'])}")
    n = int(ev.get("classify/num_samples", 0))
    lines = [f"{what} ({'+'.join(towers)} -> {opts.label_key}): {', '.join(parts)} on {n} held-out samples"]
    if probe:
        lines.append(
            f"  probe: weight decay {probe['weight_decay']:g} ({probe['chosen_by']}), "
            f"{probe['num_train']} training samples, training accuracy {_pct(probe['train_accuracy'])}"
        )
    per_class = [(k.split("/", 2)[2], v) for k, v in ev.items() if k.startswith("classify/per_class/")]
    if per_class:
        lines.append("  per class: " + ", ".join(f"{name} {_pct(v)}" for name, v in per_class))
    if "zeroshot/top1" in ev:
        parts = [f"top-1 {_pct(ev['zeroshot/top1'])}"]
        if "zeroshot/top5" in ev:
            parts.append(f"top-5 {_pct(ev['zeroshot/top5'])}")
        lines.append(f"zero-shot (base model, same held-out samples): {', '.join(parts)}")
        lines.append(f"{what} - zero-shot: {100 * (ev['classify/top1'] - ev['zeroshot/top1']):+.1f} points top-1")
    return lines
