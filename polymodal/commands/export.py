"""``polymodal export MODEL --format onnx|torch-export --out DIR [--towers image,text]``: each tower of a
contrastive model as a deployable file, with ``deployment.json`` (``polymodal.deploy``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from polymodal.deploy import DEPLOY_FORMATS

    p = subparsers.add_parser(
        "export", help="export each tower as ONNX or a torch.export program, with what running it needs"
    )
    p.add_argument("model", help="a saved model, training run, Hugging Face CLIP or open_clip directory")
    p.add_argument("--pretrained", help="weights for MODEL when it is a registered name")
    p.add_argument("--format", required=True, choices=DEPLOY_FORMATS, help="onnx (ONNX Runtime) or torch-export (.pt2)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--towers", help="comma-separated towers to export (default: all), e.g. image,text")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from polymodal.deploy import export_towers

    from ._common import load_model, parse_towers

    towers = parse_towers(args.towers)
    model = load_model(args.model, torch.device("cpu"), args.pretrained)
    out = export_towers(model, args.out, args.format, towers=towers, overwrite=args.overwrite)
    names = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {args.format} towers of {args.model} to {out}: {names}")
    return 0
