"""The ``polymodal`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from polymodal.errors import InputError, PolymodalError
from polymodal.fileio import OutputExistsError

Command = Callable[[argparse.Namespace], int]


def _list_models(args: argparse.Namespace) -> int:
    from polymodal.registry import get_model_config, list_models

    names = list_models()
    if args.json:
        rows = []
        for name in names:
            cfg = get_model_config(name)
            rows.append(
                {
                    "name": name,
                    "modalities": sorted(cfg.towers),
                    "embed_dim": cfg.embed_dim,
                    "towers": {m: t.type for m, t in sorted(cfg.towers.items())},
                }
            )
        print(json.dumps(rows, indent=2))
        return 0
    width = max(map(len, names))
    for name in names:
        cfg = get_model_config(name)
        towers = ", ".join(f"{m}={t.type}" for m, t in sorted(cfg.towers.items()))
        print(f"{name:<{width}}  embed_dim={cfg.embed_dim:<5} {towers}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    from polymodal.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    report = train(args.config, overrides=args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The end-of-run summary: throughput, then the task's own lines (accuracy, recall, ...)."""
    lines = [
        f"trained {report['steps']} steps, {report['samples_seen']} samples in {report['train_seconds']:.0f} s "
        f"({report['samples_per_s']:.0f} samples/s, {report['world_size']} process(es)); "
        f"final loss {report['final_loss']:.4f}"
    ]
    return "\n".join([*lines, *report.get("summary", [])])


def _synth(args: argparse.Namespace) -> int:
    from polymodal.datasets import write_synthetic
    from polymodal.train.config import parse_value

    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"generator option {item!r} is not KEY=VALUE (e.g. image_size=48)")
        options[key.strip()] = parse_value(value)
    if "hard_negatives" in options:
        raise InputError("hard_negatives is not a generator option; use --hard-negatives N")
    # read as text, so a bad value is one line naming the flag rather than argparse's usage block
    negatives = args.hard_negatives.strip()
    if not (negatives.isascii() and negatives.isdigit()):
        raise InputError(f"--hard-negatives must be a non-negative integer (e.g. 2), got {args.hard_negatives!r}")
    out = write_synthetic(
        args.kind,
        args.out,
        n=args.n,
        split=args.split,
        seed=args.seed,
        format=args.format,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        hard_negatives=int(negatives),
        image_format=args.image_format,
        **options,
    )
    print(f"wrote {args.n} {args.split} {args.kind} samples to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from polymodal import __version__

    parser = argparse.ArgumentParser(
        prog="polymodal", description="Multimodal models: encoders, fusion, contrastive training and tasks."
    )
    parser.add_argument("--version", action="version", version=f"polymodal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list-models", help="list the registered model names")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_list_models)

    p = sub.add_parser(
        "train", help="train from a YAML recipe: contrastive by default, or any trainer task (works under torchrun)"
    )
    p.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 data.batch_size=256")
    p.set_defaults(func=_train)

    p = sub.add_parser("data", help="built-in data")
    data_sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    q = data_sub.add_parser("synth", help="write the built-in synthetic data as files plus an index, or as shards")
    q.add_argument("kind", choices=["shapes", "tones"])
    q.add_argument("--out", required=True, help="output directory (must be empty or new)")
    q.add_argument("--n", type=int, default=1000, help="number of samples")
    q.add_argument("--split", choices=["train", "heldout"], default="train")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--format", choices=["csv", "wds"], default="csv")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per .tar shard (wds)")
    q.add_argument(
        "--image-format", choices=["png", "jpg"], default="png", help="shapes: lossless PNG or JPEG (quality 95)"
    )
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    q.add_argument(
        "--hard-negatives",
        default="0",
        metavar="N",
        help="shapes: write N wrong captions per sample (a hard_negatives column / json field), "
        "for training with data.hard_negatives",
    )
    q.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generator option, repeatable: image_size=48, two_shape_share=0.2 (shapes), sample_rate=48000 (tones)",
    )
    q.set_defaults(func=_synth)

    from polymodal.commands import register_all

    register_all(sub)  # the task commands: zeroshot, index, search, caption, finetune
    return parser


# What a user's input can raise: polymodal's own errors, and the standard ones for bad values and paths.
USER_ERRORS = (PolymodalError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line: a user sees ``error: ...`` and nothing else, not a traceback."""
    text = str(error)
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])  # KeyError's str() adds quotes
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(parts) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except OutputExistsError as e:  # say the flag, not the Python argument
        print(f"error: {e.cli_message()}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
