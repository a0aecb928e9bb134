"""The fast linear probe of ``task: classify`` with ``mode: probe`` (what ``polymodal finetune`` runs for it).

Only the head trains, so nothing is gained by running the frozen towers again at every step: the
training, validation and held-out samples are embedded once each (with progress bars) and a
logistic-regression head is fitted on the cached features (``polymodal.tasks.fit_linear_probe``,
L-BFGS by default, the weight decay chosen on a validation split). The result is the same kind of
``LateFusionClassifier`` the trainer produces, saved to ``run_dir/model``.

Validation (``probe.val``). ``heldout`` (built-in data) draws ``val_size`` extra samples the way the
held-out split is drawn, disjoint from the held-out samples that are scored: the held-out shapes
include (shape, colour) combinations that never occur in training, and a decay chosen on training
samples alone is too weak for those (on the demo model it picks ~1e-5 and the probe falls below
zero-shot on unseen combinations). Only the decay is chosen there; the head is fitted on training
samples only. ``train`` holds out a share of the training samples (and refits on all of them).

Outputs in ``run_dir``: ``model/`` (``polymodal.from_pretrained`` loads it), ``report.json``,
``confusion.png`` and ``config.yaml``. Each is written atomically and ``report.json`` last, so its
presence says the others are complete. Like the trainer, the probe writes only into an empty folder
or its own earlier run, and replaces an earlier run's outputs only with ``overwrite=true``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from polymodal.errors import ConfigError
from polymodal.fileio import atomic_directory, atomic_write_text

from .data import build_datasets
from .rundir import check_run_dir, claim_run_dir
from .task_classify import ClassifyTask, claims_datasets, classify_summary


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device here; use device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _validation_set(task: ClassifyTask, data, val_size: int):
    """``val_size`` samples drawn like the held-out split, after the ones that are scored."""
    cfg = task.cfg
    eval_size = cfg.data.generated_size("eval_size")  # probe.val=heldout is built-in data only
    data_cfg = dataclasses.replace(cfg.data, eval_size=eval_size + val_size)
    longer = dataclasses.replace(cfg, data=data_cfg)
    tf = getattr(data.eval, "transform", None)
    base = task.base
    tokenizer = getattr(data.eval, "tokenizer", None)
    if task.opts.dataset == "shape_claims":
        _, held = claims_datasets(longer, base.config, tokenizer, tf, tf)
    else:
        held = build_datasets(data_cfg, base.config, tokenizer, tf, tf).eval
    return Subset(held, range(eval_size, eval_size + val_size))


def _write_outputs(run_dir: Path, model, report: dict[str, Any], cfg, confusion, task: ClassifyTask) -> None:
    from polymodal.tasks import plot_confusion

    with atomic_directory(run_dir / "model", overwrite=True) as tmp:
        model.write_pretrained_files(tmp)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml(), overwrite=True)
    title = f"linear probe: {'+'.join(task.towers)} by {task.opts.label_key}"
    plot_confusion(confusion, task.opts.classes, run_dir / "confusion.png", title=title, overwrite=True)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n", overwrite=True)


def run_linear_probe(cfg, progress: bool | None = None) -> dict[str, Any]:
    """Fit and evaluate the linear probe ``cfg`` describes (``task: classify``, ``task_args.mode: probe``).

    Returns the report (also written to ``run_dir/report.json``), whose ``summary`` lines put the
    probe's held-out accuracy next to the base model's zero-shot accuracy on the same samples.
    """
    from polymodal.tasks import classification_metrics, extract_features, fit_linear_probe, split_validation

    from .data import make_loader
    from .loop import seed_everything

    started = time.perf_counter()
    task = ClassifyTask(cfg)
    opts, p = task.opts, task.opts.probe
    if opts.mode != "probe":
        raise ConfigError(f"run_linear_probe needs task_args.mode=probe, got {opts.mode!r}")
    run_dir = Path(cfg.run_dir)
    # refused before the slow part; nothing is written or deleted until the outputs are ready
    check_run_dir(run_dir, resuming=False, resume_asked=False, overwrite=cfg.overwrite)
    progress = cfg.progress if progress is None else progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = _device(cfg.device)

    model = task.build_model(device)
    if opts.fusion_args or (len(task.towers) > 1 and opts.fusion != "concat"):
        raise ConfigError(
            "task classify: a linear probe fits one linear head on the towers' concatenated outputs; use "
            f"fusion=concat without fusion_args (got fusion={opts.fusion!r}, fusion_args={opts.fusion_args})"
        )
    data = task.build_data(model)
    if data.eval is None:
        raise ConfigError("a linear probe is scored on held-out data: set data.eval (an index file or shard URLs)")

    def featurize(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.fusion({m: model.towers[m](inputs[m]) for m in model.towers})

    def embed(dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(dataset, cfg.data.batch_size, cfg.data.num_workers)
        return extract_features(featurize, loader, task.labels, device=device, progress=progress, desc=desc)

    x_train, y_train = embed(data.train, "embed training samples")
    x_val = y_val = None
    if p.weight_decay is None and p.val == "heldout":
        x_val, y_val = embed(_validation_set(task, data, p.val_size), "embed validation samples")
    elif p.weight_decay is None and p.val == "train":
        fraction = min(0.5, p.val_size / len(x_train))
        x_train, y_train, x_val, y_val = split_validation(x_train, y_train, fraction, seed=cfg.seed)
    x_eval, y_eval = embed(data.eval, "embed held-out samples")

    search = {"weight_decays": p.weight_decays} if p.weight_decays else {}
    probe = fit_linear_probe(
        x_train,
        y_train,
        len(opts.classes),
        x_val,
        y_val,
        weight_decay=p.weight_decay,
        method=p.method,
        max_iter=p.max_iter,
        epochs=p.epochs,
        refit=p.val == "train",
        seed=cfg.seed,
        progress=progress,
        **search,
    )
    with torch.no_grad():
        model.head.weight.copy_(probe.head.weight.to(model.head.weight))
        model.head.bias.copy_(probe.head.bias.to(model.head.bias))
    result = classification_metrics(probe.logits(x_eval), y_eval, opts.classes)
    metrics = task.metrics_of(result, data, device)
    if p.weight_decay is not None:
        chosen_by = "fixed"
    elif x_val is not None:
        chosen_by = f"best of {len(probe.val_accuracy)} on {len(y_val)} {p.val} validation samples"
    else:
        chosen_by = "default"
    probe_info = {
        "weight_decay": probe.weight_decay,
        "chosen_by": chosen_by,
        "val_accuracy": {str(k): v for k, v in probe.val_accuracy.items()},
        "train_accuracy": probe.train_accuracy,
        "num_train": probe.num_train,
        "method": probe.method,
    }
    report = {
        "task": "classify",
        "mode": "probe",
        "base": str(cfg.model.name),
        "towers": task.towers,
        "label_key": opts.label_key,
        "classes": opts.classes,
        "seconds": time.perf_counter() - started,
        "probe": probe_info,
        "eval": metrics,
    }
    report["summary"] = classify_summary(metrics, opts, task.towers, probe_info)
    created = not run_dir.exists()
    # each output replaces its predecessor only once it is complete, so none is deleted up front
    claim_run_dir(run_dir, (), resuming=False, resume_asked=False, overwrite=cfg.overwrite)
    try:
        _write_outputs(run_dir, model, report, cfg, result.confusion, task)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return report
