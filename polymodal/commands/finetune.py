"""``polymodal finetune CONFIG.yaml [key=value ...]``: a classifier on top of a trained model's towers.

The config is a training recipe with ``task: classify`` (the default here; see
``polymodal.train.task_classify`` for ``task_args``). ``task_args.mode: finetune`` runs the trainer;
``mode: probe`` embeds the data once and fits a linear head on the cached features. Either way the
summary puts the classifier's held-out accuracy next to the base model's zero-shot accuracy on the
same samples, when the base can classify the label zero-shot.

``--baselines`` also trains a classifier on each of the towers alone, with the same data, steps and
settings, and prints the three accuracies side by side (for a fusion classifier: does it use both
modalities?).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ._common import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="train a classifier on a trained model's towers (fine-tune or linear probe) from a YAML recipe",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML recipe with task_args, e.g. configs/finetune-probe.yaml")
    # REMAINDER, so that options may also follow the overrides ("CONFIG k=v --baselines"); see _split_options.
    p.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="key=value overrides, e.g. task_args.mode=finetune steps=300"
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also train on each tower alone with the same budget (into RUN_DIR-<tower>-only) and compare",
    )
    p.set_defaults(func=_finetune)


def load_finetune_config(path: str, overrides: list[str]):
    """The ``TrainConfig`` of a finetune recipe: ``task`` defaults to ``classify`` and must be it."""
    from polymodal.train.config import TrainConfig, apply_overrides, read_yaml_mapping

    if not Path(path).is_file():
        raise CommandError(f"config file {path} does not exist")
    data = read_yaml_mapping(path)
    data = apply_overrides(data, overrides)
    data.setdefault("task", "classify")
    if data["task"] != "classify":
        raise CommandError(f"polymodal finetune runs task classify; {path} sets task {data['task']!r} (use 'train')")
    return TrainConfig.from_dict(data)


def run_classify(cfg) -> dict[str, Any]:
    """Run one classify config (probe or trainer) and return its report."""
    from polymodal.train import train
    from polymodal.train.classify_probe import run_linear_probe

    if cfg.task_args.get("mode", "finetune") == "probe":
        return run_linear_probe(cfg)
    return train(cfg)


def _headline(report: dict[str, Any]) -> str:
    if report.get("mode") == "probe":
        probe = report["probe"]
        return (
            f"linear probe on {probe['num_train']} cached samples in {report['seconds']:.0f} s "
            f"(base {report['base']}, weight decay {probe['weight_decay']:g})"
        )
    from polymodal.cli import format_report

    return format_report({**report, "summary": []})


def _split_options(args: argparse.Namespace) -> None:
    """Move ``--baselines`` out of the overrides; any other ``--option`` there is an error."""
    overrides = []
    for item in args.overrides:
        if item == "--baselines":
            args.baselines = True
        elif item.startswith("-"):
            raise CommandError(f"unknown option {item}; finetune takes --baselines (and key=value overrides)")
        else:
            overrides.append(item)
    args.overrides = overrides


def _finetune(args: argparse.Namespace) -> int:
    _split_options(args)
    cfg = load_finetune_config(args.config, args.overrides)
    variants = [("configured", cfg)]
    if args.baselines:
        from polymodal.train.task_classify import ClassifyOptions

        towers = ClassifyOptions.from_args(cfg.task_args, cfg.data.source).towers
        if not towers or len(towers) < 2:
            raise CommandError(
                "--baselines compares a classifier over several towers with each tower alone; set "
                "task_args.towers to two or more towers, e.g. [image, text]"
            )
        for tower in towers:
            task_args = {**cfg.task_args, "towers": [tower]}
            single = dataclasses.replace(cfg, run_dir=f"{cfg.run_dir}-{tower}-only", task_args=task_args)
            variants.append((f"{tower} only", single))
    rows = []
    for name, variant in variants:
        report = run_classify(variant)
        print(_headline(report))
        for line in report.get("summary", []):
            print(line)
        rows.append((name, "+".join(variant.task_args.get("towers") or ["default"]), report.get("eval", {})))
    if args.baselines:
        print("\nsame data, steps and settings:")
        print(f"{'classifier':<14} {'towers':<14} {'held-out top-1':>15}")
        for name, towers, ev in rows:
            print(f"{name:<14} {towers:<14} {100 * ev.get('classify/top1', float('nan')):>14.1f}%")
    return 0
