"""``polymodal prune MODEL --heads 0.5 --mlp 0.5 --calibration DATA --out DIR``: a smaller dense model
without the least important attention heads and MLP units of its transformer towers (``polymodal.prune``).

The result is a plain model directory (``save_pretrained``) with ``pruning.json`` beside it; recovery
fine-tuning is a training run that starts from it (``configs/prune-recover.yaml``).
"""

from __future__ import annotations

import argparse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a fraction strictly between 0 and 1 (the share removed), got {text}"
        )
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from polymodal.prune import CRITERIA

    from ._calibration import add_calibration_arguments

    p = subparsers.add_parser(
        "prune",
        help="remove attention heads and MLP units, ranked on calibration data, into a smaller dense model",
        description="Score every attention head and MLP hidden unit of MODEL's transformer towers on "
        "--calibration DATA, remove the least important share of each block's, and save the smaller model. "
        "Fine-tune it afterwards to recover accuracy, distilled from MODEL: "
        "polymodal train configs/prune-recover.yaml model.name=OUT task_args.teacher=MODEL",
    )
    p.add_argument("model", help="a saved model, training run, Hugging Face CLIP or open_clip directory")
    p.add_argument("--pretrained", help="weights for MODEL when it is a registered name")
    p.add_argument("--heads", type=_ratio, help="share of each block's attention heads to remove, e.g. 0.5")
    p.add_argument("--mlp", type=_ratio, help="share of each block's MLP hidden units to remove, e.g. 0.5")
    add_calibration_arguments(p, required=True, note=" (images alone: with --criterion magnitude)")
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="taylor",
        help="taylor: first-order loss change on pairs (default); magnitude: output norms, inputs only",
    )
    p.add_argument("--towers", help="comma-separated towers to prune (default: every transformer tower)")
    p.add_argument("--out", required=True, help="output model directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from polymodal.fileio import atomic_directory
    from polymodal.prune import prune_model

    from ._calibration import calibration_batches
    from ._common import CommandError, load_model, parse_towers

    if args.heads is None and args.mlp is None:
        raise CommandError("nothing to prune: give --heads, --mlp or both (the share of each block's to remove)")
    towers = parse_towers(args.towers)
    model = load_model(args.model, torch.device("cpu"), args.pretrained)
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"{args.model} is an exported folder; prune the model it was exported from")
    batches = calibration_batches(args.calibration, model, args.calibration_size)
    result = prune_model(model, batches, heads=args.heads, mlp=args.mlp, towers=towers, criterion=args.criterion)
    summary = {"source": str(args.model), "criterion": args.criterion, "heads": args.heads, "mlp": args.mlp}
    summary.update(result.summary())
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        result.model.write_pretrained_files(tmp)
        (tmp / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    before, after = result.params_before, result.params_after
    print(f"pruned {args.model}: {before:,} -> {after:,} parameters ({after / before:.1%}); wrote {args.out}")
    for modality, tower in summary["towers"].items():
        print(
            f"  {modality}: heads per block {tower['heads_before']} -> {tower['heads_after']}, "
            f"MLP units {tower['mlp_before']} -> {tower['mlp_after']}"
        )
    return 0
