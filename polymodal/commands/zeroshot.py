"""``polymodal zeroshot``: rank your own labels for images (or sounds) with a contrastive model, and with
``--label-column`` score them against the true classes of a labelled index file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    AUDIO_EXTENSIONS,
    CommandError,
    collect_files,
    load_audio_clips,
    load_images,
    load_model,
    parse_labels,
    pick_device,
    print_json,
)


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
    p.add_argument(
        "--modality", choices=["image", "audio"], help="default: the tower text queries (image when the model has one)"
    )
    p.add_argument(
        "--label-column",
        metavar="COLUMN",
        help="score against the truth: the one input is an index file (.csv/.tsv/.jsonl) whose COLUMN holds each "
        "file's class; prints top-1/top-5 and per-class accuracy",
    )
    p.add_argument(
        "--input-column", help="with --label-column: the column of file paths (default: image, or audio for sounds)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def load_templates(spec: str | None, modality: str) -> tuple[str, ...]:
    """The templates of ``--templates``: a built-in set, a file of one template per line, or the default set."""
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
    if not ({"image", "audio"} & set(towers)):
        raise CommandError(f"the model has no image or audio tower to classify with (it has {towers})")
    return model.config.query_modality


def _labelled_files(args: argparse.Namespace, modality: str) -> tuple[list[Path], list]:
    """The files of a labelled index file and the true class of each (``--label-column``)."""
    from .index import INDEX_SUFFIXES, read_index_rows

    if len(args.inputs) != 1 or Path(args.inputs[0]).suffix.lower() not in INDEX_SUFFIXES:
        raise CommandError(
            f"--label-column reads one index file ({', '.join(INDEX_SUFFIXES)}) of files and their classes; "
            f"got {args.inputs}"
        )
    index = Path(args.inputs[0])
    if not index.is_file():
        raise CommandError(f"index file {index} does not exist")
    column = args.input_column or modality
    rows = read_index_rows(index, (column, args.label_column))
    if not rows:
        raise CommandError(f"index file {index} has no rows")
    files, missing = [], []
    for row in rows:
        name = Path(str(row.get(column) or "")).expanduser()
        path = name if name.is_absolute() else index.parent / name
        (files if path.is_file() else missing).append(path)
    if missing:
        raise CommandError(f"index file {index} names {len(missing)} file(s) that do not exist, e.g. {missing[:3]}")
    return files, [row.get(args.label_column) for row in rows]


def run(args: argparse.Namespace) -> int:
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks import ZeroShotClassifier, classification_metrics, default_top_k, embed_dataset, label_indices

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
    templates = load_templates(args.templates, modality)
    truth = None
    if args.label_column is not None:
        files, truth = _labelled_files(args, modality)
        try:
            targets = label_indices(truth, labels, where=f"{args.inputs[0]}, column {args.label_column!r},")
        except ValueError as err:
            raise CommandError(str(err)) from None
    else:
        if args.input_column is not None:
            raise CommandError("--input-column names the file column of a labelled index; it needs --label-column")
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
    chunks = [files[start : start + args.batch_size] for start in range(0, len(files), args.batch_size)]
    batches = (load_images(c, transform) if modality == "image" else load_audio_clips(c, model) for c in chunks)
    embedded = embed_dataset(model, batches, modality, batch_fn=lambda x: (x, None, None), device=device)
    logits = classifier.classify_embeddings(embedded.features)  # (N, C)
    proba = classifier.proba_from_logits(logits).cpu()
    top = proba.topk(k, dim=-1)
    results = []
    for i, (path, values, indices) in enumerate(zip(files, top.values.tolist(), top.indices.tolist())):
        ranked = [{"label": labels[c], "probability": round(float(p), 6)} for p, c in zip(values, indices)]
        row = {"input": str(path), "ranking": ranked}
        if truth is not None:
            row["true_label"] = truth[i]
        if args.multi_label:
            row["labels"] = [labels[c] for c in range(len(labels)) if proba[i, c] >= args.threshold]
        results.append(row)
    accuracy = None
    if truth is not None:
        scored = classification_metrics(logits.cpu(), targets, labels, default_top_k(len(labels)))
        accuracy = {
            **{f"top{k}": v for k, v in scored.topk.items()},
            "per_class": scored.per_class,
            "num_samples": scored.num_samples,
        }

    if args.json:
        out = {"model": args.model, "labels": labels, "multi_label": args.multi_label, "results": results}
        if accuracy is not None:
            out["accuracy"] = accuracy
        print_json(out)
        return 0
    for row in results:
        print(row["input"])
        width = max(len(r["label"]) for r in row["ranking"])
        for rank, r in enumerate(row["ranking"], 1):
            print(f"  {rank}. {r['label']:<{width}}  {100 * r['probability']:6.2f}%")
        if args.multi_label:
            print(f"  above {args.threshold:g}: {', '.join(row['labels']) or '(none)'}")
    if accuracy is not None:
        scores = [f"top-{k[3:]} {100 * v:.1f}%" for k, v in accuracy.items() if k.startswith("top")]
        print(f"accuracy against column {args.label_column!r} ({accuracy['num_samples']} inputs): " + ", ".join(scores))
        print("per-class top-1: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in accuracy["per_class"].items()))
    return 0
