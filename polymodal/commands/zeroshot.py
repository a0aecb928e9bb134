"""``polymodal zeroshot``: rank your own labels for images (or sounds) with a contrastive model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._common import CommandError, collect_files, load_images, load_model, parse_labels, pick_device, print_json

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification of images or sounds into labels you name",
        description="Rank LABELS for each input by the similarity of its embedding to prompts built from "
        "each label (the mean over a set of templates), with probabilities.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image (or audio) files, or folders of them")
    p.add_argument("--model", required=True, help="saved model directory, or a registered name with --pretrained")
    p.add_argument("--pretrained", help="weights for a registered --model name (open_clip, HF or polymodal)")
    p.add_argument("--labels", help="comma-separated class names, e.g. 'cat,dog,car'")
    p.add_argument("--labels-file", help="file with one class name per line (# starts a comment)")
    p.add_argument(
        "--templates",
        help="a file with one template per line, each with one {} for the label, or a built-in set: "
        "simple_image, image_ensemble, audio (default: simple_image for images, audio for sounds)",
    )
    p.add_argument("--top-k", type=int, default=5, help="labels shown per input (default 5, at most the label count)")
    p.add_argument("--multi-label", action="store_true", help="independent sigmoid per label instead of a softmax")
    p.add_argument("--threshold", type=float, default=0.5, help="with --multi-label: probability that counts as yes")
    p.add_argument("--modality", choices=["image", "audio"], help="default: the model's non-text tower")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _templates(spec: str | None, modality: str) -> tuple[str, ...]:
    from polymodal.tasks import TEMPLATE_SETS, check_templates

    if spec is None:
        return TEMPLATE_SETS["audio" if modality == "audio" else "simple_image"]
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise CommandError(f"--templates {spec}: no such file, and not a built-in set ({', '.join(TEMPLATE_SETS)})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise CommandError(f"template file {spec} holds no templates")
    try:
        return check_templates(templates)
    except ValueError as err:
        raise CommandError(f"template file {spec}: {err}") from None


def _modality(model, requested: str | None) -> str:
    towers = sorted(getattr(model, "towers", {}))
    if "text" not in towers or not hasattr(model, "encode_text"):
        raise CommandError(f"zero-shot needs a contrastive model with a text tower; this model has towers {towers}")
    if requested is not None:
        if requested not in towers:
            raise CommandError(f"--modality {requested}: the model has no {requested} tower (it has {towers})")
        return requested
    others = [m for m in ("image", "audio") if m in towers]
    if not others:
        raise CommandError(f"the model has no image or audio tower to classify with (it has {towers})")
    return others[0]


def _load_audio(files: list[Path], model) -> torch.Tensor:
    from polymodal.datasets import SampleError, decode_audio

    pre = model.config.preprocess
    rate = model.config.towers["audio"].args.get("sample_rate", pre.sample_rate or 16000)
    num_samples = round(rate * (pre.clip_seconds or 1.0))
    clips = []
    for path in files:
        try:
            clips.append(decode_audio(path, rate, num_samples))
        except SampleError as err:
            raise CommandError(f"{path} is not usable audio: {err}") from err
    return torch.stack(clips)


def run(args: argparse.Namespace) -> int:
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks import ZeroShotClassifier

    labels = parse_labels(args.labels, args.labels_file)
    if args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0.0 <= args.threshold <= 1.0:
        raise CommandError(f"--threshold is a probability in [0, 1], got {args.threshold}")
    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    modality = _modality(model, args.modality)
    templates = _templates(args.templates, modality)
    extensions = AUDIO_EXTENSIONS if modality == "audio" else None
    files = collect_files(args.inputs, **({"extensions": extensions} if extensions else {}), what=modality)

    classifier = ZeroShotClassifier(
        model,
        get_tokenizer(model),
        labels,
        templates,
        modality=modality,
        multi_label=args.multi_label,
        thresholds=args.threshold,
        device=device,
    )
    transform = get_preprocess(model, "image") if modality == "image" else None
    k = min(args.top_k, len(labels))
    results = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        x = load_images(chunk, transform) if modality == "image" else _load_audio(chunk, model)
        proba = classifier.predict_proba(x).cpu()  # (B, C)
        top = proba.topk(k, dim=-1)
        for i, path in enumerate(chunk):
            ranked = [
                {"label": labels[c], "probability": round(float(p), 6)}
                for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())
            ]
            row = {"input": str(path), "ranking": ranked}
            if args.multi_label:
                row["labels"] = [labels[c] for c in range(len(labels)) if proba[i, c] >= args.threshold]
            results.append(row)

    if args.json:
        print_json({"model": args.model, "labels": labels, "multi_label": args.multi_label, "results": results})
        return 0
    for row in results:
        print(row["input"])
        width = max(len(r["label"]) for r in row["ranking"])
        for rank, r in enumerate(row["ranking"], 1):
            print(f"  {rank}. {r['label']:<{width}}  {100 * r['probability']:6.2f}%")
        if args.multi_label:
            print(f"  above {args.threshold:g}: {', '.join(row['labels']) or '(none)'}")
    return 0
