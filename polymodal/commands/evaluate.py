"""``polymodal evaluate``: held-out zero-shot accuracy and text↔image (or text↔audio) retrieval of a model.

The same metrics the trainer reports at the end of a run (``polymodal.tasks.evaluate_contrastive``), for
any saved model: a training run directory (its held-out data is read from the run's ``config.yaml``), a
``save_pretrained`` directory, an imported open_clip / Hugging Face CLIP model, or a registered name with
weights, on the built-in data's held-out split or on your own index file of pairs. With ``--label-column``
and class names, an index file also gives zero-shot top-1 / top-5 and per-class accuracy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ._common import (
    BUILTIN,
    INDEX_SUFFIXES,
    CommandError,
    atomic_write_text,
    load_model,
    parse_labels,
    pick_device,
    print_json,
)
from .zeroshot import load_templates


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="held-out zero-shot accuracy and retrieval recall@1/5/10 of a contrastive model",
        description="Embed held-out pairs with MODEL and print text→item and item→text recall@1/5/10 with "
        "median and mean rank (an item fits every caption whose stated attributes it has, on the built-in "
        "data; otherwise its own caption), and on the built-in data zero-shot accuracy per attribute, "
        "also on attribute combinations never seen in training.",
    )
    p.add_argument("--model", required=True, help="training run directory, saved model directory, or registered name")
    p.add_argument("--pretrained", help="weights for a registered --model name")
    p.add_argument(
        "--data",
        help="'shapes' or 'tones' (the built-in held-out split), or an index file (.csv/.tsv/.jsonl) of pairs; "
        "default: the held-out data of the training run given as --model",
    )
    p.add_argument(
        "--eval-size", type=int, help="built-in data: number of held-out samples (default: the run's, or 1000)"
    )
    p.add_argument("--seed", type=int, help="built-in data: generation seed (default: the run's, or 0)")
    p.add_argument("--image-key", help="image column of an index file (default: the run's, or image)")
    p.add_argument("--audio-key", help="audio column of an index file (default: the run's, or audio)")
    p.add_argument("--caption-key", help="caption column of an index file (default: the run's, or caption)")
    p.add_argument(
        "--label-column",
        help="index file: the column holding each sample's class; with --labels or --labels-file, also prints "
        "zero-shot top-1/top-5 and per-class accuracy against it",
    )
    p.add_argument("--labels", help="with --label-column: comma-separated class names, e.g. 'cat,dog,car'")
    p.add_argument("--labels-file", help="with --label-column: a file with one class name per line")
    p.add_argument(
        "--templates",
        help="with --label-column: a template file (one per line, {} for the label) or a built-in set "
        "(default: simple_image for images, audio for sounds)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--out", help="directory for metrics.json and PNG plots (a retrieval grid for images)")
    p.add_argument("--overwrite", action="store_true", help="replace metrics.json and plots already in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _run_data_section(model_dir: Path):
    """The ``data`` section of a training run's resolved config, or ``None`` when MODEL is not a run."""
    from polymodal.train import load_config

    path = model_dir / "config.yaml"
    if not (model_dir / "checkpoints").is_dir() or not path.is_file():
        return None
    return load_config(path).data


def data_section(args: argparse.Namespace):
    """The held-out data to evaluate on, from ``--data`` and the run's config, checked."""
    from polymodal.train import DataSection

    run_data = _run_data_section(Path(args.model)) if Path(args.model).is_dir() else None
    if args.data is None:
        if run_data is None:
            raise CommandError(
                f"--model {args.model} is not a training run directory, so it names no held-out data; "
                "give --data shapes, --data tones or --data INDEX_FILE"
            )
        if run_data.source not in BUILTIN and not run_data.eval:
            raise CommandError(
                f"the run {args.model} had no held-out data (data.eval is empty); give --data INDEX_FILE"
            )
        cfg = run_data
    elif args.data in BUILTIN:
        same = run_data is not None and run_data.source == args.data
        cfg = replace(run_data) if same else DataSection(source=args.data)  # keep the run's generator options
    else:
        path = Path(args.data)
        if not path.is_file():
            raise CommandError(f"--data {args.data}: no such index file, and not built-in data ({', '.join(BUILTIN)})")
        if path.suffix.lower() not in INDEX_SUFFIXES:
            raise CommandError(f"--data {args.data}: expected an index file ending in {', '.join(INDEX_SUFFIXES)}")
        base = run_data if run_data is not None and run_data.source == "csv" else DataSection(source="csv")
        cfg = replace(base, source="csv", eval=str(path), train=None)
    changes = {
        "eval_size": args.eval_size,
        "seed": args.seed,
        "image_key": args.image_key,
        "audio_key": args.audio_key,
        "caption_key": args.caption_key,
    }
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if cfg.eval_size is not None and cfg.eval_size < 1:
        raise CommandError(f"--eval-size must be at least 1, got {cfg.eval_size}")
    return cfg


def _class_names(args: argparse.Namespace) -> list[str] | None:
    """The class names of ``--label-column``, or ``None`` without it; checked against the other options."""
    given = args.labels is not None or args.labels_file is not None
    if args.label_column is None:
        if given or args.templates is not None:
            raise CommandError("--labels, --labels-file and --templates need --label-column COLUMN (the true classes)")
        return None
    if args.data is None or args.data in BUILTIN:
        raise CommandError("--label-column reads an index file: give --data INDEX_FILE (.csv/.tsv/.jsonl)")
    return parse_labels(args.labels, args.labels_file)


def _label_metrics(args, model, tokenizer, embedded, modality: str, classes: list[str], device) -> dict[str, float]:
    from polymodal.tasks import zero_shot_on_labels

    column = args.label_column
    labels = [m.get(column) for m in embedded.meta]
    if all(v is None for v in labels):
        columns = sorted(k for k in embedded.meta[0] if k not in ("path", "index"))
        raise CommandError(f"--data {args.data} has no column {column!r} (it has {columns})")
    try:
        result = zero_shot_on_labels(
            model,
            tokenizer,
            embedded.embeddings[modality],
            labels,
            classes,
            load_templates(args.templates, modality),
            where=f"--data {args.data}, column {column!r},",
            device=device,
        )
    except ValueError as err:
        raise CommandError(str(err)) from None
    metrics = {f"zeroshot/{column}/top{k}": v for k, v in result.topk.items()}
    metrics.update({f"zeroshot/{column}/per_class/{name}": v for name, v in result.per_class.items()})
    return metrics


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from polymodal.datasets import collate_samples
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks import evaluate_contrastive, format_metrics
    from polymodal.train import build_datasets

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    classes = _class_names(args)
    out = Path(args.out) if args.out else None
    if out is not None and (out / "metrics.json").exists() and not args.overwrite:
        raise CommandError(f"{out / 'metrics.json'} exists; pass --overwrite to replace it")
    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    cfg = data_section(args)
    towers = getattr(model, "towers", {})
    # an eager contrastive model or captioner with a contrastive head, or an exported (DeployedModel) one
    aligned = getattr(model, "alignment", None) is not None or model.config.kind == "contrastive"
    contrastive = aligned and callable(getattr(model, "encode", None))
    if not contrastive or "text" not in towers or not ({"image", "audio"} & set(towers)):
        raise CommandError(
            f"--model {args.model} is a {type(model).__name__} with towers {sorted(towers)}; evaluate needs a "
            "contrastive model with a text tower and an image or audio tower (a CLIP, CLAP or CoCa model)"
        )
    modality = model.config.query_modality
    if cfg.source in BUILTIN and (cfg.source == "shapes") != (modality == "image"):
        raise CommandError(
            f"--data {cfg.source} holds {'images' if cfg.source == 'shapes' else 'sounds'}, but the model's "
            f"towers are {sorted(towers)}"
        )
    tokenizer = get_tokenizer(model)
    transform = get_preprocess(model, "image", is_train=False) if modality == "image" else None
    try:
        data = build_datasets(cfg, model.config, tokenizer, None, transform, with_train=False)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"held-out data: {err}") from err
    loader = DataLoader(data.eval, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_samples)
    try:
        with torch.inference_mode():
            metrics, embedded = evaluate_contrastive(
                model, tokenizer, loader, data.zero_shot, data.unseen_key, modality=modality, device=device
            )
    except ValueError as err:  # e.g. an index file whose samples are all unusable
        raise CommandError(f"evaluating on {cfg.eval or cfg.source}: {err}") from err
    if classes is not None:
        with torch.inference_mode():
            metrics.update(_label_metrics(args, model, tokenizer, embedded, modality, classes, device))
    n_held = cfg.generated_size("eval_size")
    where = cfg.eval if cfg.source not in BUILTIN else f"built-in {cfg.source}, {n_held} held-out, seed {cfg.seed}"
    result = {"model": str(args.model), "data": where, "samples": len(embedded), "metrics": metrics}
    if out is not None:
        _write_outputs(out, result, embedded, data, model, modality)
    if args.json:
        print_json(result)
        return 0
    print(f"{args.model} on {where}: {len(embedded)} pairs")
    for line in format_metrics(metrics):
        print(f"  {line}")
    per_class = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if "/per_class/" in k}
    if per_class:
        print(
            f"  per-class top-1 by {args.label_column}: "
            + ", ".join(f"{c} {100 * v:.1f}%" for c, v in per_class.items())
        )
    if out is not None:
        print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'retrieval_grid.png'}" if modality == "image" else ""))
    return 0


def _write_outputs(out: Path, result: dict, embedded, data, model, modality: str) -> None:
    from polymodal.tasks import plot_retrieval_examples
    from polymodal.train.report import held_out_images

    out.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        pre = model.config.preprocess
        plot_retrieval_examples(
            embedded,
            lambda positions: held_out_images(data.eval, embedded.meta, positions),
            out / "retrieval_grid.png",
            mean=pre.mean,
            std=pre.std,
            overwrite=True,
        )
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n", overwrite=True)  # checked above
