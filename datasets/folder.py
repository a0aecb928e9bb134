"""Labelled images laid out one folder per class (``root/<class>/**/<image>``), as torchvision's ImageFolder.

Unlike torchvision's, an unreadable image comes back as a ``SkippedSample`` with its reason instead
of raising inside a DataLoader worker, and images are decoded through ``decode_image`` (pixel
limit, truncation check, transparency composited on white).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import DEFAULT_MAX_PIXELS, decode_image
from .samples import SampleError, SkippedSample

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """Images under ``root/<class name>/``, labelled by their class folder.

    Classes are the sorted names of the sub-folders of ``root`` (hidden ones excluded); images are
    found recursively inside each. Items are ``{"image": (3, H, W), "label": LongTensor (), "meta":
    {"path", "class", "index"}}`` or a ``SkippedSample``.

    Args:
        root: folder holding one sub-folder per class.
        transform: PIL RGB image -> ``(3, H, W)`` float tensor.
        max_pixels: images with more pixels are skipped (``too_many_pixels``) without being decoded.
        extensions: file name endings counted as images (case-insensitive).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``root`` has no class folders, or no images in any of them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root not found or not a folder: {self.root}")
        self.transform = transform
        self.max_pixels = max_pixels
        self.extensions = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise ValueError(
                f"image folder {self.root} has no class folders; expected the layout root/<class name>/<image>"
            )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in self.classes:
            files = self._find_images(self.root / name)
            if not files:
                empty.append(name)
            self.samples += [(str(path), self.class_to_idx[name]) for path in files]
        if not self.samples:
            raise ValueError(
                f"image folder {self.root} has class folders {self.classes[:10]} but no files ending in "
                f"{self.extensions} inside them"
            )
        if empty:
            # Kept as classes so that label numbers still follow the sorted folder names.
            warnings.warn(f"image folder {self.root}: class folders without images: {empty}", stacklevel=2)
        self.targets = [label for _, label in self.samples]

    def _find_images(self, folder: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(self.extensions)
            ]
        return found

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | SkippedSample:
        path, label = self.samples[index]
        try:
            image = decode_image(path, self.max_pixels)
        except SampleError as err:
            return SkippedSample(err.reason, err.detail)
        return {
            "image": self.transform(image),
            "label": torch.tensor(label, dtype=torch.long),
            "meta": {"path": path, "class": self.classes[label], "index": index},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, classes={len(self.classes)}, images={len(self)})"
