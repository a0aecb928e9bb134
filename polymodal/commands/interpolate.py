"""``polymodal interpolate MODEL_A MODEL_B --alpha 0.5 --out DIR``: weight-space ensembling (WiSE-FT)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "interpolate",
        help="average the weights of two models of one architecture (WiSE-FT)",
        description="Write a model whose weights are (1 - alpha) * MODEL_A + alpha * MODEL_B, e.g. a zero-shot "
        "model and its fine-tuned copy. The two must have the same architecture and weight layout.",
    )
    p.add_argument("model_a", metavar="MODEL_A", help="saved model or training run (alpha 0 gives this one)")
    p.add_argument("model_b", metavar="MODEL_B", help="saved model or training run (alpha 1 gives this one)")
    p.add_argument("--alpha", required=True, help="weight of MODEL_B, from 0 to 1")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    import torch

    from polymodal.interpolate import interpolate_models

    from ._common import CommandError, load_model

    try:
        alpha = float(args.alpha)
    except ValueError:
        alpha = math.nan
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise CommandError(f"--alpha must be a number from 0 (MODEL_A) to 1 (MODEL_B), got {args.alpha!r}")
    cpu = torch.device("cpu")
    models = [load_model(spec, cpu) for spec in (args.model_a, args.model_b)]
    for spec, model in zip((args.model_a, args.model_b), models):
        if getattr(model, "config", None) is None:
            raise CommandError(f"{spec} is not a polymodal model with a config (an exported model cannot be averaged)")
    merged = interpolate_models(*models, alpha)
    out = merged.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {1 - alpha:g} x {args.model_a} + {alpha:g} x {args.model_b} to {out}")
    return 0
