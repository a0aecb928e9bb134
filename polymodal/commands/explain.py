"""``polymodal explain``: where in each image (or sound) a contrastive model sees a text, as PNG overlays."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polymodal.datasets.folder import IMAGE_EXTENSIONS

from ._common import (
    AUDIO_EXTENSIONS,
    CommandError,
    atomic_write_text,
    collect_files,
    load_audio_clips,
    load_images,
    load_model,
    pick_device,
    print_json,
)

SUMMARY = "explanations.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explanation maps: where a contrastive model sees a text in images or sounds",
        description="Write, per input, a PNG of an explanation map of the input's similarity to --text drawn "
        "over the input (the image, or the log-mel spectrogram of a sound), and a summary "
        f"{SUMMARY} with each map's peak. Methods: gradcam (ViT and ResNet image towers, the default for "
        "images), rollout (attention rollout, ViT image towers; the same for every text), grad_rollout "
        "(gradient-weighted attention rollout, ViT image towers), saliency (the gradient over the input or "
        "spectrogram; the default for sounds).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_AUDIO", help="image or sound files, or folders of them")
    p.add_argument("--model", required=True, help="saved model or training run directory, or a registered name")
    p.add_argument("--pretrained", help="weights for a registered --model name")
    p.add_argument("--text", required=True, help='the text to explain, e.g. "a red circle"')
    p.add_argument(
        "--method",
        choices=["gradcam", "rollout", "grad_rollout", "saliency"],
        help="default: gradcam for images, saliency for sounds",
    )
    p.add_argument(
        "--shifts",
        type=int,
        default=1,
        metavar="K",
        help="ViT maps: average over K x K copies shifted by 1/K of a patch, for finer maps (default 1)",
    )
    p.add_argument(
        "--upscale",
        type=float,
        default=1.0,
        metavar="F",
        help="images: explain them resized by F (1 to 8), for finer maps at the image's size (default 1)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and the summary")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _modality_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    kinds = ", ".join((*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS))
    raise CommandError(f"{path} is neither an image nor a sound file by its name; expected one of {kinds}")


def _methods(model, modalities: set[str], requested: str | None, shifts: int, upscale: float) -> dict[str, str]:
    """The method for each input modality, checked against the model's towers before anything runs."""
    from polymodal.tasks import resolve_method

    return {
        modality: resolve_method(model, modality, requested, shifts, upscale if modality == "image" else 1.0)
        for modality in sorted(modalities)
    }


def _targets(files: list[Path], out: Path, overwrite: bool) -> list[Path]:
    targets = [out / f"{path.stem}.png" for path in files]
    seen: dict[Path, Path] = {}
    for path, target in zip(files, targets):
        if target in seen:
            raise CommandError(f"{seen[target]} and {path} would both write {target}; explain them in separate runs")
        seen[target] = path
    if not overwrite:
        for target in [*targets, out / SUMMARY]:
            if target.exists():
                raise CommandError(f"{target} exists; pass --overwrite to replace it")
    return targets


def run(args: argparse.Namespace) -> int:
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks import explain, input_spectrogram, plot_explanation

    if not args.text.strip():
        raise CommandError('--text is empty; give the text to explain, e.g. --text "a red circle"')
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = collect_files(args.inputs, (*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS), what="image or sound")
    modalities = [_modality_of(path) for path in files]
    model = load_model(args.model, pick_device(args.device), args.pretrained)
    methods = _methods(model, set(modalities), args.method, args.shifts, args.upscale)
    out = Path(args.out)
    targets = _targets(files, out, args.overwrite)
    tokenizer = get_tokenizer(model)

    results: list[dict] = [{} for _ in files]
    for modality, method in methods.items():
        indices = [i for i, m in enumerate(modalities) if m == modality]
        spec = model.config.input_spec(modality)
        transform = get_preprocess(model, "image") if modality == "image" else None
        for start in range(0, len(indices), args.batch_size):
            chunk = indices[start : start + args.batch_size]
            paths = [files[i] for i in chunk]
            inputs = load_images(paths, transform) if modality == "image" else load_audio_clips(paths, model)
            upscale = args.upscale if modality == "image" else 1.0  # sounds are explained as they are
            maps = explain(model, modality, inputs, args.text, tokenizer, method, shifts=args.shifts, upscale=upscale)
            backgrounds = inputs if modality == "image" else input_spectrogram(model, inputs, modality)
            for i, explanation, background in zip(chunk, maps, backgrounds):
                title = f"{method}: {args.text}"
                plot_explanation(explanation, background, targets[i], title, spec.mean, spec.std, args.overwrite)
                row, col = divmod(int(explanation.flatten().argmax()), explanation.shape[-1])
                results[i] = {
                    "input": str(files[i]),
                    "output": str(targets[i]),
                    "modality": modality,
                    "method": method,
                    "shape": list(explanation.shape),
                    "peak": [row, col],
                    "mean": round(float(explanation.mean()), 6),
                }
    summary = {"model": args.model, "text": args.text, "results": results}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n", overwrite=args.overwrite)
    if args.json:
        print_json(summary)
        return 0
    axes = {"image": ("row", "column"), "audio": ("mel bin", "frame")}
    for r in results:
        (a, b), (row, col) = axes[r["modality"]], r["peak"]
        print(f"{r['input']} -> {r['output']} ({r['method']}, peak at {a} {row}, {b} {col})")
    return 0
