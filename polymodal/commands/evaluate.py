"""``polymodal evaluate``: held-out zero-shot accuracy and text↔image (or text↔audio) retrieval of a model.

The same metrics the trainer reports at the end of a run (``polymodal.train.evaluate.evaluate``), for any
saved model: a training run directory (its held-out data is read from the run's ``config.yaml``), a
``save_pretrained`` directory, an imported open_clip / Hugging Face CLIP model, or a registered name with
weights, on the built-in data's held-out split or on your own index file of pairs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ._common import CommandError, atomic_write_text, load_model, pick_device, print_json

INDEX_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
BUILTIN = ("shapes", "tones")


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
    if cfg.eval_size < 1:
        raise CommandError(f"--eval-size must be at least 1, got {cfg.eval_size}")
    return cfg


def run(args: argparse.Namespace) -> int:
    import torch

    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.train.data import build_datasets
    from polymodal.train.evaluate import evaluate, format_metrics

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out) if args.out else None
    if out is not None and (out / "metrics.json").exists() and not args.overwrite:
        raise CommandError(f"{out / 'metrics.json'} exists; pass --overwrite to replace it")
    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    cfg = data_section(args)
    towers = getattr(model, "towers", {})
    contrastive = getattr(model, "alignment", None) is not None and callable(getattr(model, "encode", None))
    if not contrastive or "text" not in towers or not ({"image", "audio"} & set(towers)):
        raise CommandError(
            f"--model {args.model} is a {type(model).__name__} with towers {sorted(towers)}; evaluate needs a "
            "contrastive model with a text tower and an image or audio tower (a CLIP, CLAP or CoCa model)"
        )
    modality = "image" if "image" in towers else "audio"
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
    try:
        with torch.inference_mode():
            metrics, extras = evaluate(
                model, tokenizer, data, device, batch_size=args.batch_size, num_workers=args.num_workers
            )
    except ValueError as err:  # e.g. an index file whose samples are all unusable
        raise CommandError(f"evaluating on {cfg.eval or cfg.source}: {err}") from err
    where = (
        cfg.eval if cfg.source not in BUILTIN else f"built-in {cfg.source}, {cfg.eval_size} held-out, seed {cfg.seed}"
    )
    result = {"model": str(args.model), "data": where, "samples": len(extras["meta"]), "metrics": metrics}
    if out is not None:
        _write_outputs(out, result, extras, data, model)
    if args.json:
        print_json(result)
        return 0
    print(f"{args.model} on {where}: {len(extras['meta'])} pairs")
    for line in format_metrics(metrics):
        print(f"  {line}")
    if out is not None:
        print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'retrieval_grid.png'}" if modality == "image" else ""))
    return 0


def _write_outputs(out: Path, result: dict, extras: dict, data, model) -> None:
    from polymodal.train.report import write_retrieval_grid

    out.mkdir(parents=True, exist_ok=True)
    if extras.get("modality") == "image":
        write_retrieval_grid(out, extras, data, model)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n", overwrite=True)  # checked above
