"""``polymodal index build`` and ``polymodal search``: embed a collection once, then search it by text or image.

An index built from a CSV of ``image,caption`` rows (what ``polymodal data synth shapes --format csv``
writes) keeps each row as metadata, so ``index build --eval`` and ``search --evaluate CSV`` can
measure text-to-image retrieval, counting every image that fits a caption as a right answer
(``polymodal.tasks.caption_matches``, the relevance the trainer and ``polymodal evaluate`` use too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ._common import CommandError, collect_files, load_images, load_model, pick_device, print_json

INDEX_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
BACKEND_CHOICES = ("exact", "faiss-ivf", "faiss-hnsw", "faiss-flat")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build an embedding index of images or texts for 'polymodal search'")
    sub = p.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    b = sub.add_parser(
        "build",
        help="embed images (or texts) with a model and save the index",
        description="Embed images (files, folders, or a CSV/TSV/JSONL index of image,caption rows) or texts "
        "(a .txt file, one per line, or the caption column of an index) and write an index directory.",
    )
    b.add_argument("--model", required=True, help="saved model directory, or a registered name with --pretrained")
    b.add_argument("--pretrained", help="weights for a registered --model name")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="PATH", help="image files, folders of them, or index files")
    what.add_argument("--texts", metavar="FILE", help="a .txt file (one text per line) or an index file's captions")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--image-key", default="image", help="image column of an index file (default image)")
    b.add_argument("--caption-key", default="caption", help="caption column of an index file (default caption)")
    b.add_argument("--backend", choices=BACKEND_CHOICES, default="exact", help="search backend stored with the index")
    b.add_argument(
        "--eval",
        action="store_true",
        help="with an index file of captioned images: print text-to-image recall@1/5/10 and ranks",
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.set_defaults(func=build)

    s = subparsers.add_parser(
        "search",
        help="search an index by text or image",
        description="Print the TOP_K items of INDEX nearest to each text query and each --image.",
    )
    s.add_argument("index", help="index directory written by 'polymodal index build'")
    s.add_argument("queries", nargs="*", metavar="TEXT", help="text queries, e.g. 'a red circle'")
    s.add_argument("--image", action="append", default=[], metavar="PATH", help="an image query (repeatable)")
    s.add_argument("--top-k", type=int, default=5, help="results per query (default 5)")
    s.add_argument("--model", help="model to embed queries with (default: the one the index records)")
    s.add_argument("--pretrained", help="weights for a registered --model name")
    s.add_argument("--evaluate", metavar="INDEX_FILE", help="a CSV of image,caption rows whose images are indexed")
    s.add_argument("--image-key", default="image", help="image column of --evaluate (default image)")
    s.add_argument("--caption-key", default="caption", help="caption column of --evaluate (default caption)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=search)


# ----------------------------------------------------------------------------------------------------
# Inputs


def _cell(value: Any) -> Any:
    # Index files written by 'polymodal data synth' store nested attributes (mentions, shapes) as JSON.
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_index_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of an index file; a malformed row (missing or extra cells, bad JSON) is an error naming it,
    as an index or an evaluation silently without some of the user's rows would mislead."""
    from polymodal.datasets import read_index

    rows = read_index(path, required_columns=columns)
    bad = [r for r in rows if not isinstance(r, dict)]
    if bad:
        raise CommandError(f"index file {path} has {len(bad)} unreadable row(s), e.g. {bad[0].detail}")
    return rows


def read_captioned_rows(path: str | Path, image_key: str, caption_key: str) -> list[dict[str, Any]]:
    """Rows of an image index file, each with ``path`` (the image, resolved) and ``caption``; every image must exist."""

    path = Path(path)
    rows = read_index_rows(path, (image_key, caption_key))
    if not rows:
        raise CommandError(f"index file {path} has no rows")
    out, missing = [], []
    for number, row in enumerate(rows, start=2):
        name, caption = row.get(image_key), row.get(caption_key)
        if not isinstance(name, str) or not name.strip():
            raise CommandError(f"index file {path}, row {number}: no image in column {image_key!r}")
        if not isinstance(caption, str) or not caption.strip():
            raise CommandError(f"index file {path}, row {number}: no caption in column {caption_key!r}")
        image = Path(name).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            missing.append(str(image))
        meta = {k: _cell(v) for k, v in row.items() if k not in (image_key, caption_key)}
        out.append({**meta, "caption": caption.strip(), "path": str(image)})
    if missing:
        raise CommandError(f"index file {path} names {len(missing)} image(s) that do not exist, e.g. {missing[:3]}")
    return out


def _image_items(inputs: list[str], image_key: str, caption_key: str) -> tuple[list[Path], list[dict], bool]:
    """Files and metadata from ``--images``; the flag says whether every item has a caption."""
    files, metadata, captioned = [], [], True
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in INDEX_SUFFIXES:
            rows = read_captioned_rows(path, image_key, caption_key)
            files += [Path(r["path"]) for r in rows]
            metadata += rows
        else:
            found = collect_files([item])
            files += found
            metadata += [{"path": str(f)} for f in found]
            captioned = False
    return files, metadata, captioned


def _text_items(path_str: str, caption_key: str) -> tuple[list[str], list[dict]]:

    path = Path(path_str)
    if not path.is_file():
        raise CommandError(f"--texts {path_str} does not exist")
    if path.suffix.lower() in INDEX_SUFFIXES:
        rows = read_index_rows(path, (caption_key,))
        rows = [r for r in rows if isinstance(r.get(caption_key), str) and r[caption_key].strip()]
        texts = [r[caption_key].strip() for r in rows]
        metadata = [{k: _cell(v) for k, v in r.items() if k != caption_key} for r in rows]
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        metadata = [{} for _ in texts]
    if not texts:
        raise CommandError(f"--texts {path_str} holds no texts")
    return texts, metadata


def _check_out(out: Path, overwrite: bool) -> None:
    from polymodal.tasks.index import INDEX_FILE

    if out.exists() and not overwrite:
        raise CommandError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / INDEX_FILE).is_file():
        raise CommandError(f"--out {out} exists and is not an index (no {INDEX_FILE}); refusing to replace it")


def _decode(path: Path):
    from polymodal.datasets import decode_image

    return decode_image(path)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_captions(index, model, tokenizer, rows: list[int], metadata: list[dict]) -> dict[str, float]:
    """Text-to-image and image-to-text retrieval over the indexed images ``rows`` and their captions.

    Args:
        index: an image ``EmbeddingIndex``.
        model: the model that built it (checked).
        tokenizer: the model's tokenizer.
        rows: positions in the index of the evaluated images (the gallery).
        metadata: per evaluated image, its metadata with ``caption`` (and ``mentions``, if known).
    """
    from polymodal.tasks import caption_matches, embed_dataset, retrieval_metrics

    index.check_model(model)
    captions = [m["caption"] for m in metadata]
    batches = [tokenizer(captions[start : start + 256]) for start in range(0, len(captions), 256)]
    text_emb = embed_dataset(model, batches, "text", batch_fn=lambda tokens: (tokens, None, None)).features
    image_emb = index.embeddings[torch.tensor(rows, device=index.embeddings.device)].cpu()
    text_to_image, image_to_text = caption_matches(metadata)
    metrics = {}
    for name, (q, g, relevant) in {
        "text_to_image": (text_emb, image_emb, text_to_image),
        "image_to_text": (image_emb, text_emb, image_to_text),
    }.items():
        for key, value in retrieval_metrics(q, g, relevant, ks=(1, 5, 10)).items():
            metrics[f"{name}/{key}"] = value
    return metrics


def _format_metrics(metrics: dict[str, float], count: int) -> list[str]:
    from polymodal.tasks import format_metrics

    lines = format_metrics({f"retrieval/{k}": v for k, v in metrics.items() if "_to_" in k})
    return [f"retrieval over {count} captioned images (any image that fits a caption counts):"] + [
        f"  {x}" for x in lines
    ]


# ----------------------------------------------------------------------------------------------------
# Commands


def build(args: argparse.Namespace) -> int:
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks.index import EmbeddingIndex

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.images is not None:
        files, metadata, captioned = _image_items(args.images, args.image_key, args.caption_key)
        if args.eval and not captioned:
            raise CommandError(
                "--eval needs a caption for every image: pass --images as an index file of image,caption rows "
                "(e.g. the index.csv that 'polymodal data synth shapes --format csv' writes)"
            )
    else:
        if args.eval:
            raise CommandError("--eval evaluates an image index; build it with --images INDEX_FILE")
        texts, metadata = _text_items(args.texts, args.caption_key)

    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    towers = sorted(getattr(model, "towers", {}))
    needed = "image" if args.images is not None else "text"
    if needed not in towers or not hasattr(model, f"encode_{needed}"):
        raise CommandError(f"--model {args.model} has no {needed} tower to embed with (it has {towers})")
    backend, _, kind = args.backend.partition("-")
    options = {"backend": backend, "faiss_kind": kind or "ivf", "batch_size": args.batch_size, "device": device}
    if args.images is not None:
        index = EmbeddingIndex.from_files(model, files, get_preprocess(model, "image"), decode=_decode, **options)
        for meta, extra in zip(index.metadata, metadata):
            meta.update(extra)
    else:
        index = EmbeddingIndex.from_texts(model, texts, get_tokenizer(model), metadata=metadata, **options)
    if Path(args.model).is_dir():
        index.model_info["source"] = str(Path(args.model).resolve())
    else:
        index.model_info["source"] = args.model
        index.model_info["pretrained"] = str(Path(args.pretrained).resolve())

    lines = []
    if args.eval:
        metrics = evaluate_captions(index, model, get_tokenizer(model), list(range(len(index))), index.metadata)
        lines = _format_metrics(metrics, len(index))
    if backend == "faiss":
        index.build_faiss()
    index.save(out, overwrite=args.overwrite)  # an existing index: the CLI names --overwrite
    name = index.model_info["name"]
    print(f"wrote an index of {len(index)} {index.modality} embeddings (dim {index.dim}, model {name}) to {out}")
    for line in lines:
        print(line)
    return 0


def _load_search_model(args: argparse.Namespace, index, device: torch.device):
    if args.model is not None:
        return load_model(args.model, device, args.pretrained)
    source, pretrained = index.model_info.get("source"), index.model_info.get("pretrained")
    if not source:
        raise CommandError(f"index {args.index} records no model; pass --model DIR")
    if pretrained is None and not Path(source).is_dir():
        raise CommandError(f"the model that built index {args.index} ({source}) is no longer there; pass --model DIR")
    return load_model(source, device, pretrained)


def _evaluation_rows(index, csv_path: str, image_key: str, caption_key: str) -> tuple[list[int], list[dict]]:
    if index.modality != "image":
        raise CommandError(f"--evaluate needs an image index; {index.modality} index given")
    rows = read_captioned_rows(csv_path, image_key, caption_key)
    position = {str(Path(i).resolve()): n for n, i in enumerate(index.ids)}
    missing = [r["path"] for r in rows if str(Path(r["path"]).resolve()) not in position]
    if missing:
        raise CommandError(f"{len(missing)} image(s) of {csv_path} are not in the index, e.g. {missing[:3]}")
    return [position[str(Path(r["path"]).resolve())] for r in rows], rows


def search(args: argparse.Namespace) -> int:
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks.index import EmbeddingIndex

    if args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    if not args.queries and not args.image and not args.evaluate:
        raise CommandError("give a text query, --image PATH, or --evaluate INDEX_FILE")
    empty = [q for q in args.queries if not q.strip()]
    if empty:
        raise CommandError("text queries must not be empty")
    for image in args.image:
        if not Path(image).is_file():
            raise CommandError(f"--image {image} does not exist")
    try:
        index = EmbeddingIndex.load(args.index)
    except FileNotFoundError as err:
        raise CommandError(str(err)) from None
    evaluation_rows = (
        _evaluation_rows(index, args.evaluate, args.image_key, args.caption_key) if args.evaluate else None
    )
    device = pick_device(args.device)
    model = _load_search_model(args, index, device)
    index.check_model(model)

    results = []
    if args.queries:
        found = index.search_text(model, get_tokenizer(model), args.queries, k=args.top_k)
        results += [("text", q, found, i) for i, q in enumerate(args.queries)]
    if args.image:
        if "image" not in getattr(model, "towers", {}):
            raise CommandError(f"--image queries need a model with an image tower; {index.model_info['name']} has none")
        batch = load_images([Path(p) for p in args.image], get_preprocess(model, "image"))
        found = index.search_image(model, batch, k=args.top_k)
        results += [("image", p, found, i) for i, p in enumerate(args.image)]

    rows = [
        {
            "query": query,
            "kind": kind,
            "results": [
                {"rank": r + 1, "score": round(float(found.scores[i, r]), 6), "id": found.ids[i][r], "metadata": meta}
                for r, meta in enumerate(found.metadata[i])
            ],
        }
        for kind, query, found, i in results
    ]
    metrics = None
    if evaluation_rows is not None:
        positions, metadata = evaluation_rows
        metrics = evaluate_captions(index, model, get_tokenizer(model), positions, metadata)

    if args.json:
        out: dict[str, Any] = {"index": args.index, "model": index.model_info.get("name"), "queries": rows}
        if metrics is not None:
            out["evaluation"] = {"num_images": len(evaluation_rows[0]), **metrics}
        print_json(out)
        return 0
    for row in rows:
        print(f"{row['kind']} query: {row['query']}")
        for hit in row["results"]:
            caption = hit["metadata"].get("caption")
            extra = f"  {caption}" if caption and caption != hit["id"] else ""
            print(f"  {hit['rank']:>3}. {hit['score']:.4f}  {hit['id']}{extra}")
    if metrics is not None:
        for line in _format_metrics(metrics, len(evaluation_rows[0])):
            print(line)
    return 0
