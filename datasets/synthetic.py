"""What the built-in synthetic data sets share, and writing them to disk as CSV + files or WebDataset shards.

Every sample is a pure function of ``(seed, split, index)``: its random generator is derived from
those three numbers alone, so sample ``i`` is the same whichever DataLoader worker makes it, in
whatever order, and whether it is generated on the fly or read back from files written here.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from polymodal.fileio import OutputExistsError, atomic_directory

__all__ = ["MANIFEST_NAME", "SPLITS", "SYNTHETIC_KINDS", "sample_rng", "write_synthetic"]

SPLITS = ("train", "heldout")
SYNTHETIC_KINDS = ("shapes", "tones")
MANIFEST_NAME = "synthetic.json"
_FORMATS = ("csv", "wds")
# How write_synthetic may encode the shapes' images (file extension -> PIL format name).
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
# img2dataset's default JPEG quality, so written JPEGs weigh and decode like web-scale shards
JPEG_QUALITY = 95
# Distinguishes the random streams of the two data sets, so the same (seed, split, index) draws
# unrelated numbers for a shape and a tone.
_STREAM_IDS = {"shapes": 1, "tones": 2, "shapes-negatives": 3}


def check_split(split: str) -> int:
    """The number of ``split`` in ``SPLITS``, or a clear error."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _check_non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def sample_rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample, derived only from ``(kind, seed, split, index)``.

    Args:
        kind: ``"shapes"``, ``"tones"`` or ``"shapes-negatives"`` (a shapes sample's hard negatives, drawn
            apart from the sample itself so asking for them changes no image or caption).
        seed: data set seed (a non-negative integer).
        split: ``"train"`` or ``"heldout"``.
        index: position of the sample in its split.
    """
    seed = _check_non_negative_int(seed, "seed")
    index = _check_non_negative_int(index, "index")
    return np.random.default_rng([seed, _STREAM_IDS[kind], check_split(split), index])


def with_article(phrase: str) -> str:
    """``"a red circle"`` / ``"an orange circle"``: the indefinite article the phrase's first word takes."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def dataset_index(index: int, length: int, name: str) -> int:
    """Resolve a (possibly negative) item index against ``length`` as a sequence would."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{name} indices must be integers, got {type(index).__name__}")
    resolved = int(index) + length if index < 0 else int(index)
    if not 0 <= resolved < length:
        raise IndexError(f"{name} index {index} is out of range for {length} samples")
    return resolved


# ----------------------------------------------------------------------------------------------------
# Writers


def _csv_value(value: Any) -> Any:
    # Nested attributes (the list of shapes in an image) go into one cell as JSON; None as an empty cell.
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _encode_image(image, ext: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMATS[ext], **({"quality": JPEG_QUALITY} if ext == "jpg" else {}))
    return buffer.getvalue()


def _encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _sample_maker(
    kind: str, split: str, seed: int, options: dict[str, Any], hard_negatives: int = 0, image_format: str = "png"
) -> tuple[str, str, Callable]:
    """(media column, file extension, index -> (media bytes, caption, attrs)) for one data set; with
    ``hard_negatives`` the shapes' attrs also hold ``"hard_negatives"``, a list of that many wrong captions;
    the shapes' images are encoded as ``image_format`` (a key of ``IMAGE_FORMATS``)."""
    # Imported here: those modules import the shared helpers above from this one.
    from .synthetic_shapes import make_shape_sample, sample_hard_negatives
    from .synthetic_tones import make_tone_sample

    maker = make_shape_sample if kind == "shapes" else make_tone_sample
    allowed = set(inspect.signature(maker).parameters) - {"index", "split", "seed"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} option(s) {unknown}; expected some of {sorted(allowed)}")
    if kind == "shapes":

        def make(index: int) -> tuple[bytes, str, dict]:
            sample = make_shape_sample(index, split, seed, **options)
            attrs = sample.attrs
            if hard_negatives:
                attrs = {**attrs, "hard_negatives": sample_hard_negatives(sample, index, split, seed, hard_negatives)}
            return _encode_image(sample.image, image_format), sample.caption, attrs

        return "image", image_format, make

    def make(index: int) -> tuple[bytes, str, dict]:
        sample = make_tone_sample(index, split, seed, **options)
        return _encode_wav(sample.audio, sample.sample_rate), sample.caption, sample.attrs

    return "audio", "wav", make


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(out_dir, "is not empty: choose an empty or new directory")
    if not (out_dir / MANIFEST_NAME).is_file():
        # overwrite=True deletes the directory's contents; only do that to what this function wrote.
        raise FileExistsError(
            f"out_dir {str(out_dir)!r} is not empty and has no {MANIFEST_NAME}, so it was not written by "
            "write_synthetic; refusing to delete its contents even with overwrite=True"
        )


def _write_csv(root: Path, n: int, media_key: str, ext: str, make: Callable, bar: tqdm) -> Path:
    folder = "images" if media_key == "image" else "audio"
    (root / folder).mkdir()
    width = max(6, len(str(n - 1)))
    rows = []
    for index in range(n):
        data, caption, attrs = make(index)
        relative = f"{folder}/{index:0{width}d}.{ext}"
        (root / relative).write_bytes(data)
        rows.append({media_key: relative, "caption": caption, **{k: _csv_value(v) for k, v in attrs.items()}})
        bar.update(1)
    index_path = root / "index.csv"
    with open(index_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return index_path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed, so the same data gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _write_wds(root: Path, n: int, ext: str, shard_size: int, make: Callable, bar: tqdm) -> Path:
    width = max(6, len(str(n - 1)))
    num_shards = -(-n // shard_size)
    for shard in range(num_shards):
        # The whole folder appears atomically (atomic_directory), so a shard needs no temporary name.
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                data, caption, attrs = make(index)
                key = f"{index:0{width}d}"
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(attrs, sort_keys=True).encode("utf-8"))
                bar.update(1)
    return root


def write_synthetic(
    kind: str,
    out_dir: str | os.PathLike,
    n: int,
    split: str = "train",
    seed: int = 0,
    format: str = "csv",
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    hard_negatives: int = 0,
    image_format: str = "png",
    **options: Any,
) -> Path:
    """Generate ``n`` samples of a built-in data set and write them to ``out_dir``.

    ``format="csv"`` writes ``images/000000.png`` (or ``audio/000000.wav``, 16-bit PCM) and an
    ``index.csv`` with the columns ``image`` (or ``audio``, paths relative to the index), ``caption``
    and one column per attribute (nested ones as JSON, missing ones empty). ``format="wds"`` writes
    WebDataset shards ``shard-000000.tar``, ... of ``shard_size`` samples, each sample stored as
    ``{key}.png`` (or ``.wav``), ``{key}.txt`` (caption) and ``{key}.json`` (attributes). Both also
    write ``synthetic.json`` recording how the data was made. Files are the same samples that
    ``ShapesDataset`` / ``TonesDataset`` generate for the same split, seed and options.

    ``image_format="jpg"`` stores the shapes as JPEGs (quality ``JPEG_QUALITY``) instead of lossless
    PNGs, ``images/000000.jpg`` or ``{key}.jpg``: the encoding most image-text data sets ship in, and
    what a decode-inclusive throughput benchmark should read.

    With ``hard_negatives`` (shapes only), each sample also gets that many wrong captions, those of
    ``ShapesDataset(hard_negatives=...)``: a ``hard_negatives`` column of the index (a JSON list) or
    field of the json member (a list), where ``ImageTextDataset`` / ``WebDatasetPairs`` (and the
    trainer's ``data.hard_negatives``) read them. The attributes (``shape``, ``colour``, ...) are
    written either way, for ``data.group_by``.

    The whole directory is built under a temporary name next to ``out_dir`` and renamed into place
    at the end, so an interrupted run leaves nothing half-written behind.

    Args:
        kind: ``"shapes"`` or ``"tones"``.
        out_dir: directory to create; it must be new or empty unless ``overwrite``.
        n: number of samples (indices ``0 .. n-1`` of the split).
        split: ``"train"`` or ``"heldout"``; write both by calling twice with two directories.
        seed: data seed.
        format: ``"csv"`` or ``"wds"``.
        shard_size: samples per WebDataset shard.
        overwrite: replace an ``out_dir`` holding earlier output of this function. A non-empty
            directory without its ``synthetic.json`` is never deleted.
        progress: show a tqdm progress bar.
        hard_negatives: wrong captions written per sample (``hard_negative_captions``); shapes only.
        image_format: ``"png"`` or ``"jpg"``; shapes only.
        **options: generation options passed on to ``make_shape_sample`` (``image_size``,
            ``antialias``, ...) or ``make_tone_sample`` (``sample_rate``, ``clip_seconds``).

    Returns:
        The ``index.csv`` path for ``csv``, the shard directory for ``wds``.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    check_split(split)
    _check_non_negative_int(seed, "seed")
    if _check_non_negative_int(n, "n") == 0:
        raise ValueError("n must be at least 1")
    if _check_non_negative_int(shard_size, "shard_size") == 0:
        raise ValueError("shard_size must be at least 1")
    if _check_non_negative_int(hard_negatives, "hard_negatives") and kind != "shapes":
        raise ValueError(f"hard_negatives are made for the shapes only; {kind} has no wrong captions to write")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {tuple(IMAGE_FORMATS)}, got {image_format!r}")
    if image_format != "png" and kind != "shapes":
        raise ValueError(f"image_format applies to the shapes only; {kind} is written as WAV audio")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    media_key, ext, make = _sample_maker(kind, split, seed, options, hard_negatives, image_format)
    make(0)  # fail on bad options before creating anything
    manifest = {"kind": kind, "split": split, "seed": seed, "n": n, "format": format, "options": options}
    if hard_negatives:
        manifest["hard_negatives"] = hard_negatives
    if image_format != "png":
        manifest["image_format"] = image_format
    if format == "wds":
        manifest["shard_size"] = shard_size
    # _check_out_dir has refused what must not be replaced: a new, empty or earlier output folder remains.
    with (
        atomic_directory(out_dir, overwrite=True) as root,
        tqdm(total=n, desc=f"{kind}/{split}", unit="sample", disable=not progress) as bar,
    ):
        if format == "csv":
            result = _write_csv(root, n, media_key, ext, make, bar).name
        else:
            _write_wds(root, n, ext, shard_size, make, bar)
            result = None
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir / result if result else out_dir
