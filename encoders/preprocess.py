"""Turning decoded images and audio into the tensors the encoders expect.

``ToRGB``, ``load_audio`` and ``AudioPreprocess`` are defined in ``polymodal.media``, a leaf module
that ``polymodal.datasets`` uses too, and are part of this module's API as before.

Image evaluation transforms reproduce open_clip's ``image_transform`` exactly for RGB input, so
weights converted from open_clip see the pixels they were trained on. Everything here is a
plain picklable object (no lambdas), because DataLoader workers pickle their transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

# RGB conversion and audio loading live in a leaf module that the data pipeline shares.
from polymodal.media import AudioPreprocess, ToRGB, load_audio

from .layers import to_pair

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AudioPreprocess",
    "CenterCropOrPad",
    "ResizeKeepAspect",
    "ToRGB",
    "image_transform",
    "load_audio",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}
_RESIZE_MODES = ("shortest", "longest", "squash")


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if len(value) != 3:
        raise ValueError(f"{name} must be a float or three per-channel values, got {value!r}")
    return tuple(float(v) for v in value)


class ResizeKeepAspect:
    """Resize so the image covers (``"shortest"``) or fits inside (``"longest"``) a target box,
    keeping its aspect ratio; side lengths are rounded to the nearest pixel.

    Args:
        size: target (height, width).
        mode: ``"shortest"`` or ``"longest"``.
        interpolation: a torchvision ``InterpolationMode``.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mode: str = "shortest",
        interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC,
    ) -> None:
        if mode not in ("shortest", "longest"):
            raise ValueError(f"mode must be 'shortest' or 'longest', got {mode!r}")
        self.size = to_pair(size)
        self.mode = mode
        self.interpolation = interpolation

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _, height, width = TF.get_dimensions(image)
        ratios = (height / self.size[0], width / self.size[1])
        ratio = min(ratios) if self.mode == "shortest" else max(ratios)
        new_size = [round(height / ratio), round(width / ratio)]
        return TF.resize(image, new_size, self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mode={self.mode!r}, interpolation={self.interpolation})"


class CenterCropOrPad:
    """Center-crop to ``size``, first padding evenly with ``fill`` along any side that is too short.

    Args:
        size: target (height, width).
        fill: padding value.
    """

    def __init__(self, size: tuple[int, int], fill: int = 0) -> None:
        self.size = to_pair(size)
        self.fill = fill

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _, height, width = TF.get_dimensions(image)
        crop_h, crop_w = self.size
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            # Left/top get the smaller half, as torchvision's CenterCrop does.
            image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill)
            height, width = height + pad_h, width + pad_w
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
        return TF.crop(image, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


def image_transform(
    image_size: int | tuple[int, int],
    is_train: bool,
    mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
    std: float | Sequence[float] = OPENAI_CLIP_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = False,
    color_jitter: float | tuple[float, ...] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> T.Compose:
    """Build the transform from a PIL image to a normalised ``(3, H, W)`` float tensor.

    Evaluation: RGB conversion, resize, center crop, to tensor, normalise, giving the same
    numbers as ``open_clip.transform.image_transform(image_size, is_train=False, ...)`` with the
    same size, mean, std and resize mode, and the same interpolation except in one case:
    open_clip resizes to non-square sizes with bicubic whatever it is asked for, while here
    ``interpolation`` is always honoured. RGB conversion comes first here (open_clip converts
    after resizing), so palette and transparent images are resized as RGB. Training: RGB conversion,
    ``RandomResizedCrop(scale, ratio)``, optional horizontal flip and color jitter, to tensor,
    normalise.

    Args:
        image_size: output side, or (height, width).
        is_train: build the augmenting training transform instead of the deterministic one.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        resize_mode: evaluation only: ``"shortest"`` (resize the short side, center crop),
            ``"longest"`` (resize the long side, pad with ``fill_color``) or ``"squash"``
            (resize to the exact size, ignoring aspect ratio).
        fill_color: padding value for ``resize_mode="longest"``.
        scale: training only: range of the crop's area relative to the image.
        ratio: training only: range of the crop's aspect ratio.
        hflip: training only: flip horizontally with probability 0.5.
        color_jitter: training only: brightness/contrast/saturation strength, or a tuple of
            (brightness, contrast, saturation[, hue]); ``None`` for no jitter.
        background: colour transparent pixels are composited onto.
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
    mode = _INTERPOLATIONS[interpolation]
    size = to_pair(image_size)
    normalize = T.Normalize(mean=_triple(mean, "mean"), std=_triple(std, "std"))
    steps: list = [ToRGB(background)]

    if is_train:
        steps.append(T.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=mode))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        if color_jitter is not None:
            jitter = (color_jitter,) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
            steps.append(T.ColorJitter(*jitter))
    elif resize_mode == "squash":
        steps.append(T.Resize(size, interpolation=mode))
    elif resize_mode == "longest":
        steps += [ResizeKeepAspect(size, "longest", mode), CenterCropOrPad(size, fill_color)]
    elif size[0] == size[1]:
        # torchvision's Resize(int) truncates the long side where ResizeKeepAspect rounds; open_clip
        # uses it for square targets, and so do we to match its output pixel for pixel.
        steps += [T.Resize(size[0], interpolation=mode), CenterCropOrPad(size)]
    else:
        steps += [ResizeKeepAspect(size, "shortest", mode), CenterCropOrPad(size)]

    steps += [T.ToTensor(), normalize]
    return T.Compose(steps)
