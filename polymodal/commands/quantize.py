"""``polymodal quantize MODEL --method dynamic|static [--calibration DATA] --out DIR``: an int8 ONNX
deployment folder of a contrastive model (``polymodal.quantize``), which ``--model`` of every other
command accepts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from polymodal.quantize import QUANT_METHODS

    from ._calibration import add_calibration_arguments

    p = subparsers.add_parser(
        "quantize",
        help="post-training int8 quantization of each tower, run by ONNX Runtime",
        description="Export each tower of MODEL to ONNX and quantize it to int8: 'dynamic' (weights int8, "
        "activations quantized on the fly; no data needed) or 'static' (activation ranges calibrated on "
        "--calibration DATA). The folder written runs with --model of zeroshot, evaluate, index and search.",
    )
    p.add_argument("model", help="a saved model, training run, Hugging Face CLIP, open_clip or ONNX export folder")
    p.add_argument("--pretrained", help="weights for MODEL when it is a registered name")
    p.add_argument("--method", required=True, choices=QUANT_METHODS, help="dynamic or static (calibrated)")
    add_calibration_arguments(p, required=False, note=" (static only)")
    p.add_argument("--towers", help="comma-separated towers to quantize (default: all), e.g. image")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from polymodal.quantize import quantize_towers

    from ._calibration import calibration_batches
    from ._common import CommandError, load_model, parse_towers

    if args.method == "static" and args.calibration is None:
        raise CommandError("--method static calibrates activation ranges on data: give --calibration DATA")
    if args.method == "dynamic" and args.calibration is not None:
        raise CommandError("--method dynamic takes no --calibration (activations are measured as it runs)")
    towers = parse_towers(args.towers)
    model = load_model(args.model, torch.device("cpu"), args.pretrained)
    calibration = None
    if args.calibration is not None:
        calibration = calibration_batches(args.calibration, model, args.calibration_size)
    out = quantize_towers(model, args.out, args.method, calibration, towers=towers, overwrite=args.overwrite)
    names = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote int8 ({args.method}) towers of {args.model} to {out}: {names}")
    return 0
