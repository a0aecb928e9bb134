"""Image-text and audio-text pairs listed in an index file (CSV, TSV or JSON Lines).

The index names one file and one caption per row; any other columns (labels, ids, ...) are
carried along in each item's ``meta``. Paths are relative to the index file's folder unless
``root`` is given, so a dataset folder can be moved as a whole. Unusable rows (a missing file,
an empty caption, missing or extra cells, a line that is not JSON, a bad ``mentions`` value) come
back as ``SkippedSample`` (see ``polymodal.datasets.samples``), never as exceptions; only a file
that is unusable as a whole (no header, a missing column) raises ``InputError``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from polymodal.errors import InputError

from .decode import DEFAULT_MAX_PIXELS, decode_audio, decode_caption, decode_image
from .samples import BAD_HARD_NEGATIVES, MALFORMED_ROW, MISSING_CAPTION, MISSING_FILE, SampleError, SkippedSample

__all__ = ["INDEX_FORMATS", "AudioTextDataset", "ImageTextDataset", "read_hard_negatives", "read_index"]

INDEX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[dict | SkippedSample]]:
    # surrogateescape keeps a row with stray non-UTF-8 bytes readable; decode_caption then skips
    # that row as bad_encoding instead of the whole index failing to load.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        # Plain TSV (as most caption dumps are written) does not quote, and captions often start
        # with a quote character, so quotes are data there; CSV follows the usual quoting rules.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"index file {path} is empty; expected a header row naming the columns") from None
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise InputError(f"index file {path} has duplicate column names {duplicates}")
        rows: list[dict | SkippedSample] = []
        for fields in reader:
            if not fields:
                continue  # blank line
            if len(fields) != len(header):
                rows.append(
                    SkippedSample(
                        MALFORMED_ROW,
                        f"{path} line {reader.line_num}: {len(fields)} fields but the header has {len(header)} "
                        f"({header}); quote fields that contain the delimiter",
                    )
                )
                continue
            rows.append({name: (value if value != "" else None) for name, value in zip(header, fields)})
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[dict | SkippedSample]]:
    rows: list[dict | SkippedSample] = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(SkippedSample(MALFORMED_ROW, f"{path} line {line_number}: not valid JSON ({err.msg})"))
                continue
            if not isinstance(row, dict):
                detail = f"{path} line {line_number}: expected a JSON object, got {type(row).__name__}"
                rows.append(SkippedSample(MALFORMED_ROW, detail))
                continue
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
    return columns, rows


def read_index(
    path: str | os.PathLike,
    format: str | None = None,
    required_columns: Sequence[str] = (),
) -> list[dict | SkippedSample]:
    """Read an index of samples: one dict per row.

    A row that cannot be read (missing or extra cells, a line that is not a JSON object) comes
    back as a ``SkippedSample`` with reason ``malformed_row`` naming the file and line, so the
    datasets skip and count it like any bad sample and the ``SkipBudget`` stops a run on a mostly
    bad file. Problems of the whole file (no header, a missing column) raise.

    Args:
        path: a ``.csv``, ``.tsv`` or ``.jsonl`` (``.ndjson``) file.
        format: ``"csv"``, ``"tsv"`` or ``"jsonl"``, overriding the extension.
        required_columns: columns that must exist (in the header, or in at least one JSON line).

    Returns:
        The rows, in file order. Empty CSV/TSV cells become ``None``; JSON values keep their types.

    Raises:
        FileNotFoundError: no file at ``path``.
        InputError: an unknown format, an empty file, duplicate or missing columns.
    """
    path = Path(path)
    if format is None:
        format = INDEX_FORMATS.get(path.suffix.lower())
        if format is None:
            raise InputError(
                f"cannot tell the format of index file {path} from its extension {path.suffix!r}; "
                f"expected one of {sorted(INDEX_FORMATS)} or pass format='csv', 'tsv' or 'jsonl'"
            )
    if format not in ("csv", "tsv", "jsonl"):
        raise InputError(f"unknown index format {format!r}; expected 'csv', 'tsv' or 'jsonl'")
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    if format == "jsonl":
        columns, rows = _read_jsonl(path)
    else:
        columns, rows = _read_delimited(path, "," if format == "csv" else "\t")
    missing = [name for name in required_columns if name not in columns]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise InputError(f"index file {path} has no column {names}; its columns are {columns}")
    return rows


def _check_mentions(value: object) -> None:
    """``mentions`` lists the attributes a caption states: a list of names, or one as JSON text."""
    if value is None:
        return
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
    if not (isinstance(parsed, list) and all(isinstance(name, str) for name in parsed)):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise SampleError(MALFORMED_ROW, f"'mentions' must be a list of attribute names (JSON), got {shown}")


def _resolve(value: object, root: Path, column: str) -> Path:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SampleError(MISSING_FILE, f"no file named in column {column!r}")
    if not isinstance(value, str):
        raise SampleError(MISSING_FILE, f"column {column!r} holds a {type(value).__name__}, expected a path")
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else root / path


def read_hard_negatives(value: object, n: int, column: str, what: str = "column") -> list[str]:
    """``n`` hard-negative captions from an index cell or a shard's json field: a list of captions (JSON Lines,
    WebDataset json), or the text of a JSON list (CSV / TSV): its first ``n``, repeated in turn when it holds fewer.

    The one rule for hard negatives wherever they are read from (``ImageTextDataset``, ``AudioTextDataset``,
    ``WebDatasetPairs``).

    Args:
        value: the cell or field; ``None`` when empty or absent.
        n: how many to give.
        column: its name, for the message.
        what: what holds it (``"column"``, ``"json field"``), for the message.

    Raises:
        SampleError: ``bad_hard_negatives`` for anything but a non-empty list of non-empty strings.
    """
    if value is None:
        raise SampleError(BAD_HARD_NEGATIVES, f"{what} {column!r} is empty or missing; expected a list of captions")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SampleError(
                BAD_HARD_NEGATIVES, f"{what} {column!r} holds {value[:60]!r}, not a JSON list of captions"
            ) from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise SampleError(
            BAD_HARD_NEGATIVES, f"{what} {column!r} must hold a non-empty list of captions, got {str(value)[:60]!r}"
        )
    captions = [decode_caption(v) for v in value]
    return [captions[i % len(captions)] for i in range(n)]


class _PairDataset(Dataset):
    """Rows of an index, each a file plus a caption; subclasses decode the file."""

    def __init__(
        self,
        index_path: str | os.PathLike,
        tokenizer: Callable[[str], torch.Tensor],
        file_key: str,
        caption_key: str,
        root: str | os.PathLike | None,
        format: str | None,
        hard_negatives: int = 0,
        hard_negatives_key: str = "hard_negatives",
    ) -> None:
        if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
            raise ValueError(f"hard_negatives must be a non-negative integer, got {hard_negatives!r}")
        self.hard_negatives, self.hard_negatives_key = hard_negatives, hard_negatives_key
        self.index_path = Path(index_path)
        required = (file_key, caption_key) + ((hard_negatives_key,) if hard_negatives else ())
        self.rows = read_index(self.index_path, format, required_columns=required)
        self.root = Path(root) if root is not None else self.index_path.parent
        self.tokenizer = tokenizer
        self.file_key = file_key
        self.caption_key = caption_key

    def __len__(self) -> int:
        return len(self.rows)

    def _decode_file(self, path: Path) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _tokens(self, caption: str) -> torch.Tensor:
        tokens = self.tokenizer(caption)
        return tokens[0] if tokens.ndim == 2 else tokens

    def __getitem__(self, index: int) -> dict | SkippedSample:
        row = self.rows[index]
        if isinstance(row, SkippedSample):
            return row  # a malformed row; its detail names the file and line
        try:
            _check_mentions(row.get("mentions"))
            if self.caption_key not in row:
                raise SampleError(MISSING_CAPTION, f"row has no {self.caption_key!r} field")
            caption = decode_caption(row[self.caption_key])
            negatives = (
                read_hard_negatives(row.get(self.hard_negatives_key), self.hard_negatives, self.hard_negatives_key)
                if self.hard_negatives
                else []
            )
            path = _resolve(row.get(self.file_key), self.root, self.file_key)
            item = self._decode_file(path)
        except SampleError as err:
            return SkippedSample(err.reason, f"{self.index_path} row {index}: {err.detail}")
        item["text"] = self._tokens(caption)  # (context_length,)
        if negatives:
            item["text_negatives"] = torch.stack([self._tokens(c) for c in negatives])  # (n, context_length)
        extras = {key: value for key, value in row.items() if key not in (self.file_key, self.caption_key)}
        item["meta"] = {**extras, "caption": caption, "path": str(path), "index": index}
        return item


class ImageTextDataset(_PairDataset):
    """Image-caption pairs from an index file.

    Items are ``{"image": (3, H, W), "text": (context_length,), "meta": {...}}`` or a ``SkippedSample``.

    Args:
        index_path: CSV, TSV or JSONL file with an image path and a caption per row.
        transform: PIL RGB image -> ``(3, H, W)`` float tensor, e.g. ``polymodal.get_preprocess(...)``.
        tokenizer: caption -> ``LongTensor (1, context_length)`` (or ``(context_length,)``).
        image_key: column holding the image path.
        caption_key: column holding the caption.
        max_pixels: images with more pixels are skipped (``too_many_pixels``) without being decoded.
        root: folder the image paths are relative to; the index file's folder by default.
        format: index format, when the extension does not say it.
        hard_negatives: give each item this many wrong captions, tokenized as ``"text_negatives"``
            ``(hard_negatives, L)``, from the ``hard_negatives_key`` column (see ``read_hard_negatives``);
            a row whose cell is not a list of captions is skipped (``bad_hard_negatives``).
        hard_negatives_key: column holding them.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[str], torch.Tensor],
        image_key: str = "image",
        caption_key: str = "caption",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        root: str | os.PathLike | None = None,
        format: str | None = None,
        hard_negatives: int = 0,
        hard_negatives_key: str = "hard_negatives",
    ) -> None:
        super().__init__(
            index_path, tokenizer, image_key, caption_key, root, format, hard_negatives, hard_negatives_key
        )
        self.transform = transform
        self.max_pixels = max_pixels

    def _decode_file(self, path: Path) -> dict[str, torch.Tensor]:
        return {"image": self.transform(decode_image(path, self.max_pixels))}


class AudioTextDataset(_PairDataset):
    """Audio-caption pairs from an index file.

    Items are ``{"audio": (num_samples,), "text": (context_length,), "meta": {...}}`` or a ``SkippedSample``;
    audio is mixed to mono, resampled to ``sample_rate`` and cropped or padded to ``clip_seconds``.

    Args:
        index_path: CSV, TSV or JSONL file with an audio path and a caption per row.
        tokenizer: caption -> ``LongTensor (1, context_length)`` (or ``(context_length,)``).
        sample_rate: output rate in Hz (the audio encoder's).
        clip_seconds: output length in seconds.
        audio_key: column holding the audio path.
        caption_key: column holding the caption.
        random_crop: crop long clips at a random offset (training) instead of the centre.
        root: folder the audio paths are relative to; the index file's folder by default.
        format: index format, when the extension does not say it.
        silence_threshold: clips whose peak amplitude is below this are skipped as silent.
        hard_negatives: give each item this many wrong captions, tokenized as ``"text_negatives"``
            ``(hard_negatives, L)``, from the ``hard_negatives_key`` column (see ``read_hard_negatives``);
            a row whose cell is not a list of captions is skipped (``bad_hard_negatives``).
        hard_negatives_key: column holding them.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        tokenizer: Callable[[str], torch.Tensor],
        sample_rate: int,
        clip_seconds: float,
        audio_key: str = "audio",
        caption_key: str = "caption",
        random_crop: bool = False,
        root: str | os.PathLike | None = None,
        format: str | None = None,
        silence_threshold: float = 1e-4,
        hard_negatives: int = 0,
        hard_negatives_key: str = "hard_negatives",
    ) -> None:
        if sample_rate <= 0 or clip_seconds <= 0:
            raise ValueError(f"need a positive sample_rate and clip_seconds, got {sample_rate} and {clip_seconds}")
        super().__init__(
            index_path, tokenizer, audio_key, caption_key, root, format, hard_negatives, hard_negatives_key
        )
        self.sample_rate = int(sample_rate)
        self.num_samples = round(clip_seconds * sample_rate)
        self.random_crop = random_crop
        self.silence_threshold = silence_threshold

    def _decode_file(self, path: Path) -> dict[str, torch.Tensor]:
        audio = decode_audio(path, self.sample_rate, self.num_samples, self.random_crop, self.silence_threshold)
        return {"audio": audio}
