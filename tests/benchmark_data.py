"""Tiny datasets in the layouts ``polymodal benchmark`` reads, written as the tools that make them write them:
an image folder per class, clip_benchmark's WebDataset export (through webdataset's own ``ShardWriter``, as
``clip_benchmark.webdataset_builder.convert_dataset`` does) and a Karpathy caption JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from polymodal.datasets import COLOURS, make_shape_sample

# the images' colour names are the classes: 8 of them, so that top-5 is measured
CLASSES = list(COLOURS)


def shape_images(n: int, offset: int = 0) -> list[tuple[Image.Image, str, str]]:
    """``n`` held-out shapes images as ``(image, colour, caption)``, 48 x 48."""
    out = []
    for i in range(offset, offset + n):
        sample = make_shape_sample(i, "heldout", seed=0, image_size=48)
        out.append((sample.image, sample.attrs["colour"], sample.caption))
    return out


def encoded(image: Image.Image, fmt: str) -> bytes:
    options = {"webp": {"format": "webp", "lossless": True}, "png": {"format": "png"}, "jpg": {"format": "jpeg"}}
    buf = io.BytesIO()
    image.save(buf, **options[fmt])
    return buf.getvalue()


def write_image_folder(root: Path, images: list[tuple[Image.Image, str, str]], start: int = 0) -> dict[str, int]:
    """``root/<colour>/<i>.png``; returns how many images each class folder got."""
    counts: dict[str, int] = {}
    for i, (image, colour, _) in enumerate(images, start):
        (root / colour).mkdir(parents=True, exist_ok=True)
        image.save(root / colour / f"{i:05d}.png")
        counts[colour] = counts.get(colour, 0) + 1
    return counts


def write_clip_benchmark_wds(
    root: Path,
    samples: list[dict],
    class_names: list[str] | None = CLASSES,
    templates: list[str] | None = ("a photo of a {c} shape.", "a {c} thing."),
    split: str = "test",
    max_count: int = 4,
    nshards_file: bool = True,
    dataset_type: str | None = None,
) -> list[Path]:
    """clip_benchmark's layout: ``root/classnames.txt``, ``root/zeroshot_classification_templates.txt``,
    ``root/<split>/0.tar, 1.tar, ...`` of ``samples`` (dicts of members, e.g. ``{"webp": ..., "cls": 3}``,
    keyed ``s0000000``, ...) and ``root/<split>/nshards.txt``."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    if class_names is not None:
        (root / "classnames.txt").write_text("\n".join(class_names) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type is not None:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    with wds.ShardWriter(str(folder / "%d.tar"), maxcount=max_count, verbose=0) as sink:
        for index, sample in enumerate(samples):
            sink.write({"__key__": f"s{index:07d}", **sample})
        num_shards = sink.shard
    if nshards_file:
        (folder / "nshards.txt").write_text(f"{num_shards}\n")
    return [folder / f"{i}.tar" for i in range(num_shards)]


def classification_samples(images: list[tuple[Image.Image, str, str]], fmt: str = "webp") -> list[dict]:
    return [{fmt: encoded(image, fmt), "cls": CLASSES.index(colour)} for image, colour, _ in images]


def write_karpathy(
    root: Path, entries: list[dict], name: str = "dataset_coco.json", images: dict[str, Image.Image] | None = None
) -> Path:
    """A Karpathy caption file of ``entries`` and, for ``images`` (relative path -> image), the image files."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, image in (images or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
    path = root / name
    path.write_text(json.dumps({"images": entries, "dataset": name.removeprefix("dataset_").removesuffix(".json")}))
    return path


def karpathy_entry(filename: str, split: str, captions: list[str], filepath: str | None = None, **extra) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return {**entry, **extra}


def captions_of(caption: str, colour: str, index: int) -> list[str]:
    """Five distinct captions per image, as in COCO and Flickr30k."""
    return [caption, f"a {colour} shape.", f"picture {index}: something {colour}.", f"{caption} on black", f"{index}"]
