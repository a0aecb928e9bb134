"""Readers for the dataset layouts benchmarks are published in.

Three layouts, each read as written by the tools that make them:

- **folder**: labelled images one folder per class (``root/<class>/<image>``, ``ImageFolderDataset``),
  optionally split as ``root/train/<class>/...`` and ``root/test/<class>/...``. Class names come from
  the folder names, or from a file (``read_class_names``) matched to the folders by
  ``match_folder_classes``.
- **wds**: the WebDataset export of clip_benchmark: ``root/classnames.txt`` (line i names class i),
  ``root/zeroshot_classification_templates.txt`` (one template per line, ``{c}`` for the class name),
  an optional ``root/dataset_type.txt`` (``classification``, the default, or ``retrieval``) and shards
  ``root/<split>/0.tar, 1.tar, ...`` (counted by ``root/<split>/nshards.txt`` when it is there; a
  ``sizes.json`` of samples per shard is used for the length). A sample holds one image (``webp``,
  ``png``, ``jpg``/``jpeg``) and its class index as text (``cls``), or for retrieval its captions, one
  per line (``txt``).
- **karpathy**: the caption files of Karpathy's COCO / Flickr30k splits (``dataset_coco.json``,
  ``dataset_flickr30k.json``): ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"},
  ...]}, ...]}``, images at ``images_root/filepath/filename``.

A file that does not follow its layout raises ``BenchmarkLayoutError`` naming the file and what was
expected. A bad sample (an unreadable image, a missing label) comes back as a ``SkippedSample``, as
in every dataset of this package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from polymodal.errors import InputError

from .decode import DEFAULT_MAX_PIXELS, decode_caption, decode_image
from .samples import CORRUPT_SHARD, EMPTY_CAPTION, MALFORMED_ROW, MISSING_FILE, SampleError, SkippedSample

__all__ = [
    "CLASSNAMES_FILE",
    "LAYOUTS",
    "TEMPLATES_FILE",
    "BenchmarkLayoutError",
    "CaptionedImage",
    "CaptionedImageDataset",
    "ClipBenchmarkWds",
    "WdsBenchmarkDataset",
    "class_folder_root",
    "match_folder_classes",
    "read_class_names",
    "read_clip_benchmark_wds",
    "read_karpathy",
    "read_templates",
    "resolve_layout",
]

LAYOUTS = ("folder", "wds", "karpathy")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
SIZES_FILE = "sizes.json"
WDS_DATASET_TYPES = ("classification", "retrieval")
# clip_benchmark's image members; "0.webp" is how some of its exports name the first of several images
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg", "0.webp")
KARPATHY_LAYOUT = '{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}'


class BenchmarkLayoutError(InputError):
    """A dataset folder or file that does not follow the layout it was read as."""


# ----------------------------------------------------------------------------------- class names, templates


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise BenchmarkLayoutError(f"{what} {path} does not exist")
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as err:
        raise BenchmarkLayoutError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a file with one name per line, line i naming class i.

    Blank lines at the end are ignored; a blank line before the last name, or a repeated name, is an error
    (either would shift or merge the classes that follow).
    """
    path = Path(path)
    names = _lines(path, "class name file")
    while names and not names[-1]:
        names.pop()
    if not names:
        raise BenchmarkLayoutError(f"class name file {path} holds no class names; expected one name per line")
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise BenchmarkLayoutError(
            f"class name file {path}: line {blank[0]} is blank; line i names class i, so every line needs a name"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BenchmarkLayoutError(f"class name file {path} repeats {repeated[:10]}; each class must appear once")
    return names


def template_from_placeholder(line: str) -> str:
    """A clip_benchmark template (``{c}`` for the class name) in polymodal's form (``{}``); other braces are
    kept as literal text. A line without ``{c}`` is taken to be in polymodal's form already."""
    if "{c}" not in line:
        return line
    return line.replace("{", "{{").replace("}", "}}").replace("{{c}}", "{}")


def read_templates(path: str | os.PathLike) -> list[str]:
    """The templates of a file with one per line, ``{c}`` (clip_benchmark) or ``{}`` for the class name,
    in polymodal's ``{}`` form; blank lines and lines starting with ``#`` are left out.
    (``polymodal.tasks.check_templates`` checks that each has exactly one place for the name.)"""
    path = Path(path)
    templates = [template_from_placeholder(t) for t in _lines(path, "template file") if t and not t.startswith("#")]
    if not templates:
        raise BenchmarkLayoutError(f"template file {path} holds no templates; expected one per line, e.g. 'a {{c}}.'")
    return templates


def match_folder_classes(folders: Sequence[str], names: Sequence[str], source: str) -> list[str]:
    """The class name of each class folder (in ``folders``' order) from a list of ``names``.

    When ``names`` are the folder names in another order, each folder keeps its own name. When none of
    them is a folder name, they are display names in the folders' sorted order (line i names the i-th
    folder, as ImageNet's readable class names do for its synset folders). Anything else (another count,
    or only some names matching folders) is an error naming the difference.

    Args:
        folders: the class folder names, in label order.
        names: the class names given.
        source: where ``names`` came from, for the error message.
    """
    folders, names = list(folders), list(names)
    if len(names) != len(folders):
        raise BenchmarkLayoutError(
            f"{source} has {len(names)} class names but the dataset has {len(folders)} class folders "
            f"({_shown(folders)}); give one name per folder"
        )
    known = set(folders)
    matching = [n for n in names if n in known]
    if not matching:
        return names
    if len(matching) < len(names):
        unknown = [n for n in names if n not in known]
        missing = [f for f in folders if f not in set(names)]
        raise BenchmarkLayoutError(
            f"{source} names folders and non-folders: {_shown(unknown)} are not class folders "
            f"(folders not named: {_shown(missing)}); give exactly the folder names, or one display name per "
            "folder in sorted folder order"
        )
    return folders


def _shown(items: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{list(items[:limit])}{more}"


# ------------------------------------------------------------------------------------------------- layouts


def class_folder_root(root: str | os.PathLike, split: str) -> Path:
    """``root/<split>`` when it holds class folders (a dataset split as train/ and test/), else ``root``."""
    root = Path(root)
    candidate = root / split
    if candidate.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in candidate.iterdir()):
        return candidate
    return root


def resolve_layout(path: str | os.PathLike, split: str = "test", layout: str = "auto") -> tuple[str, Path]:
    """Which layout ``path`` is in, and the path to read it from.

    ``auto``: a ``.json`` file, or a folder holding exactly one ``dataset_*.json``, is ``karpathy``; a
    folder with shards (``<split>/*.tar`` or ``<split>/nshards.txt``) or a ``classnames.txt`` is ``wds``;
    any other folder is ``folder``.
    """
    path = Path(path)
    if layout not in ("auto", *LAYOUTS):
        raise BenchmarkLayoutError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if not path.exists():
        raise BenchmarkLayoutError(f"dataset {path} does not exist")
    if path.is_file():
        if layout in ("auto", "karpathy") and path.suffix.lower() == ".json":
            return "karpathy", path
        raise BenchmarkLayoutError(
            f"dataset {path} is a file; expected a Karpathy caption file (.json) or a dataset folder"
        )
    captions = sorted(path.glob("dataset_*.json"))
    if layout == "karpathy" or (layout == "auto" and len(captions) == 1):
        if len(captions) != 1:
            found = f"it holds {[p.name for p in captions]}" if captions else "it holds none"
            raise BenchmarkLayoutError(
                f"dataset folder {path}: expected exactly one Karpathy caption file dataset_*.json ({found}); "
                "pass the file itself"
            )
        return "karpathy", captions[0]
    shards = path / split
    is_wds = (shards / NSHARDS_FILE).is_file() or any(shards.glob("*.tar")) or (path / CLASSNAMES_FILE).is_file()
    if layout == "wds" or (layout == "auto" and is_wds):
        return "wds", path
    return "folder", path


# ------------------------------------------------------------------------------------ clip_benchmark shards


@dataclass(frozen=True)
class ClipBenchmarkWds:
    """A split of a dataset in clip_benchmark's WebDataset layout (see the module docstring).

    Attributes:
        root: the dataset folder.
        split: the split read (``test``, ``train``, ...).
        shards: the split's shard files, in order.
        dataset_type: ``classification`` or ``retrieval``.
        class_names: from ``classnames.txt``, or ``None`` without one.
        templates: from ``zeroshot_classification_templates.txt`` in polymodal's ``{}`` form, or ``None``.
        num_samples: samples in the split from ``sizes.json``, or ``None`` when it does not say.
    """

    root: Path
    split: str
    shards: tuple[Path, ...]
    dataset_type: str
    class_names: list[str] | None
    templates: list[str] | None
    num_samples: int | None


def _shard_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def _split_shards(root: Path, split: str) -> tuple[Path, ...]:
    folder = root / split
    expected = f"the clip_benchmark layout {root}/{split}/0.tar, 1.tar, ..."
    if not folder.is_dir():
        raise BenchmarkLayoutError(f"dataset {root} has no {split}/ folder of shards; expected {expected}")
    count_file = folder / NSHARDS_FILE
    if count_file.is_file():
        text = count_file.read_text(encoding="utf-8").strip()
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            raise BenchmarkLayoutError(f"{count_file} must hold the number of shards (e.g. 4), got {text!r}")
        shards = tuple(folder / f"{i}.tar" for i in range(int(text)))
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise BenchmarkLayoutError(f"{count_file} says {text} shards, but {folder} lacks {_shown(missing)}")
        return shards
    shards = tuple(sorted(folder.glob("*.tar"), key=_shard_order))
    if not shards:
        raise BenchmarkLayoutError(f"{folder} holds no .tar shards; expected {expected}")
    return shards


def _split_size(folder: Path, shards: Sequence[Path]) -> int | None:
    path = folder / SIZES_FILE
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
        return sum(int(sizes[p.name]) for p in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # optional metadata: only the progress bar's total depends on it


def read_clip_benchmark_wds(root: str | os.PathLike, split: str = "test") -> ClipBenchmarkWds:
    """Read the layout of a clip_benchmark WebDataset export (its shards are read by ``WdsBenchmarkDataset``)."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkLayoutError(f"dataset folder {root} does not exist")
    shards = _split_shards(root, split)
    type_file = root / DATASET_TYPE_FILE
    dataset_type = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if dataset_type not in WDS_DATASET_TYPES:
        raise BenchmarkLayoutError(
            f"{type_file} says {dataset_type!r}; polymodal reads {' and '.join(WDS_DATASET_TYPES)} datasets"
        )
    names_file, templates_file = root / CLASSNAMES_FILE, root / TEMPLATES_FILE
    return ClipBenchmarkWds(
        root=root,
        split=split,
        shards=shards,
        dataset_type=dataset_type,
        class_names=read_class_names(names_file) if names_file.is_file() else None,
        templates=read_templates(templates_file) if templates_file.is_file() else None,
        num_samples=_split_size(root / split, shards),
    )


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image)


class WdsBenchmarkDataset(IterableDataset):
    """The samples of clip_benchmark shards, in shard order (each DataLoader worker reads every n-th shard).

    Items are ``{"image": (3, H, W), "label": LongTensor (), "meta": {"key", "shard"}}`` for classification,
    ``{"image", "meta": {"key", "shard", "captions": [...]}}`` for retrieval, or a ``SkippedSample``: an
    unreadable image, a missing or non-integer ``cls``, no caption, or the rest of an unreadable shard.

    Args:
        layout: what ``read_clip_benchmark_wds`` read.
        transform: PIL RGB image -> ``(3, H, W)`` tensor; ``to_tensor`` by default.
        max_pixels: images with more pixels are skipped without being decoded.
    """

    def __init__(
        self,
        layout: ClipBenchmarkWds,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.transform = transform if transform is not None else _image_to_tensor
        self.max_pixels = max_pixels
        self.retrieval = layout.dataset_type == "retrieval"
        self._wanted = frozenset((*WDS_IMAGE_EXTENSIONS, "txt" if self.retrieval else "cls"))

    def __len__(self) -> int:
        if self.layout.num_samples is None:
            raise TypeError(f"the shards of {self.layout.root} do not say how many samples they hold (no sizes.json)")
        return self.layout.num_samples

    def __iter__(self) -> Iterator[dict | SkippedSample]:
        worker = get_worker_info()
        shards = self.layout.shards if worker is None else self.layout.shards[worker.id :: worker.num_workers]
        for shard in shards:
            for raw in self._read_shard(shard):
                yield raw if isinstance(raw, SkippedSample) else self._decode(raw)

    def _wants(self, name: str) -> bool:
        key, ext = base_plus_ext(name)
        return key is not None and ext.lower() in self._wanted

    def _read_shard(self, shard: Path) -> Iterator[dict | SkippedSample]:
        """Consecutive members sharing a key, grouped into ``{"__key__", "__url__", ext: bytes}``."""
        current: dict | None = None
        count = 0
        try:
            with open(shard, "rb") as stream:
                for member in tar_file_iterator(stream, select_files=self._wants):
                    key, ext = base_plus_ext(member["fname"])
                    if current is not None and current["__key__"] != key:
                        count += 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": str(shard)}
                    current[ext.lower()] = member["data"]
        except Exception as err:  # a truncated or broken tar: what was read whole is still usable
            if current is not None:
                yield current
            yield SkippedSample(
                CORRUPT_SHARD, f"{shard}: unreadable after {count} samples: {type(err).__name__}: {err}"
            )
            return
        if current is not None:
            yield current

    def _decode(self, raw: dict) -> dict | SkippedSample:
        where = f"{raw['__url__']}:{raw['__key__']}"
        meta = {"key": raw["__key__"], "shard": raw["__url__"]}
        ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in raw), None)
        try:
            if ext is None:
                raise SampleError(MISSING_FILE, f"no {'/'.join(WDS_IMAGE_EXTENSIONS[:4])} member")
            if self.retrieval:
                meta["captions"] = _captions(raw.get("txt"))
            else:
                label = _label(raw.get("cls"))
            image = self.transform(decode_image(raw[ext], self.max_pixels))
        except SampleError as err:
            return SkippedSample(err.reason, f"{where}: {err.detail}")
        if self.retrieval:
            return {"image": image, "meta": meta}
        return {"image": image, "label": torch.tensor(label, dtype=torch.long), "meta": meta}


def _label(value: bytes | None) -> int:
    if value is None:
        raise SampleError(MALFORMED_ROW, "no cls member (the class index)")
    text = value.decode("utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise SampleError(MALFORMED_ROW, f"cls member {text[:20]!r} is not a class index (0, 1, ...)")
    return int(text)


def _captions(value: bytes | None) -> list[str]:
    if value is None:
        raise SampleError(EMPTY_CAPTION, "no txt member (the captions, one per line)")
    captions = []
    for line in bytes(value).splitlines():
        try:
            captions.append(decode_caption(line))
        except SampleError:
            continue  # a blank line between captions
    if not captions:
        raise SampleError(EMPTY_CAPTION, "the txt member holds no caption")
    return captions


# ---------------------------------------------------------------------------------------- Karpathy captions


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a caption dataset and its reference captions."""

    path: Path
    captions: tuple[str, ...]


def _field(record: object, name: str, where: str, path: Path) -> object:
    if not isinstance(record, dict):
        raise BenchmarkLayoutError(
            f"{path}: {where} is a {type(record).__name__}, not an object; expected {KARPATHY_LAYOUT}"
        )
    if name not in record:
        raise BenchmarkLayoutError(f'{path}: {where} has no "{name}" field; expected {KARPATHY_LAYOUT}')
    return record[name]


def read_karpathy(
    json_path: str | os.PathLike, split: str = "test", images_root: str | os.PathLike | None = None
) -> list[CaptionedImage]:
    """The images of one split of a Karpathy caption file, with their captions, in file order.

    Args:
        json_path: ``dataset_coco.json``, ``dataset_flickr30k.json`` or a file in the same layout.
        split: ``test``, ``val``, ``train`` or ``restval``.
        images_root: where the images are (``images_root/filepath/filename``); default the file's folder.
    """
    path = Path(json_path)
    if not path.is_file():
        raise BenchmarkLayoutError(f"Karpathy caption file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkLayoutError(f"{path} is not a JSON file ({err}); expected {KARPATHY_LAYOUT}") from None
    images = _field(data, "images", "the top level", path)
    if not isinstance(images, list):
        raise BenchmarkLayoutError(
            f'{path}: "images" is a {type(images).__name__}, not a list; expected {KARPATHY_LAYOUT}'
        )
    root = Path(images_root) if images_root is not None else path.parent
    found, splits = [], set()
    for i, record in enumerate(images):
        where = f"images[{i}]"
        filename, image_split = _field(record, "filename", where, path), _field(record, "split", where, path)
        sentences = _field(record, "sentences", where, path)
        if not isinstance(sentences, list):
            raise BenchmarkLayoutError(f"{path}: {where}.sentences is not a list; expected {KARPATHY_LAYOUT}")
        raw = [_field(s, "raw", f"{where}.sentences[{j}]", path) for j, s in enumerate(sentences)]
        splits.add(str(image_split))
        if image_split != split:
            continue
        if not isinstance(filename, str) or not filename:
            raise BenchmarkLayoutError(f"{path}: {where}.filename must be a file name, got {filename!r}")
        folder = record.get("filepath") or ""
        found.append(CaptionedImage(root / str(folder) / filename, tuple(str(r) for r in raw)))
    if not found:
        raise BenchmarkLayoutError(f'{path} has no images in split "{split}"; its splits are {sorted(splits)}')
    return found


class CaptionedImageDataset(Dataset):
    """Images with their captions (e.g. from ``read_karpathy``): items ``{"image": (3, H, W), "meta": {"path",
    "index", "captions"}}``, or a ``SkippedSample`` for an unreadable image or one without a usable caption."""

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict | SkippedSample:
        entry = self.images[index]
        captions = []
        for caption in entry.captions:
            try:
                captions.append(decode_caption(caption))
            except SampleError:
                continue
        if not captions:
            return SkippedSample(EMPTY_CAPTION, f"{entry.path}: none of its {len(entry.captions)} captions has text")
        try:
            image = self.transform(decode_image(entry.path, self.max_pixels))
        except SampleError as err:
            return SkippedSample(err.reason, err.detail)
        return {"image": image, "meta": {"path": str(entry.path), "index": index, "captions": captions}}
