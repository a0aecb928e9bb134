"""Turning decoded images and audio into the tensors the encoders expect.

Image evaluation transforms reproduce open_clip's ``image_transform`` exactly for RGB input, so
weights converted from open_clip see the pixels they were trained on. Everything here is a
plain picklable object (no lambdas), because DataLoader workers pickle their transforms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from .layers import to_pair

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
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if len(value) != 3:
        raise ValueError(f"{name} must be a float or three per-channel values, got {value!r}")
    return tuple(float(v) for v in value)


class ToRGB:
    """Convert a PIL image (or a uint8 array) of any mode to 8-bit RGB.

    Unlike a bare ``image.convert("RGB")``: transparent pixels are composited onto
    ``background`` instead of showing whatever colour they happen to store (often black);
    16-bit and 32-bit integer grayscale is scaled from 0-65535 instead of clipped at 255
    (which turns most such images white); CMYK uses the multiplicative ``(1 - C)(1 - K)``
    formula on every Pillow version (older ones subtract, which crushes dark tones). RGB
    images come back unchanged; other modes (L, 1, P, YCbCr, ...) use Pillow's conversion.

    Args:
        background: RGB colour that transparent areas are composited onto.
    """

    def __init__(self, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.background = tuple(int(c) for c in background)

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"ToRGB expects a PIL image or a uint8 numpy array, got {type(image).__name__}")
        mode = image.mode
        if mode == "RGB":
            return image
        if mode == "CMYK":
            cmyk = np.asarray(image, dtype=np.uint32)  # (H, W, 4)
            ink = 255 - cmyk[..., :3]
            key = 255 - cmyk[..., 3:]
            return Image.fromarray(((ink * key + 127) // 255).astype(np.uint8), "RGB")
        if mode == "I" or mode.startswith("I;16"):
            # 16-bit PNG/TIFF decode to these modes; 65535 / 255 = 257 maps full scale to full scale.
            gray = np.asarray(image).astype(np.float64)
            gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(gray, "L").convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return self._composite(image)
        return image.convert("RGB")

    def _composite(self, image: Image.Image) -> Image.Image:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*self.background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(background={self.background})"


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


# --------------------------------------------------------------------------------------------- audio


def load_audio(path: str | os.PathLike | BinaryIO) -> tuple[torch.Tensor, int]:
    """Decode an audio file (WAV, FLAC, OGG, MP3, ... whatever libsndfile reads).

    Args:
        path: a file path, or an open binary file object (e.g. ``io.BytesIO`` of a shard member).

    Returns:
        The waveform as a float32 ``(channels, samples)`` tensor in [-1, 1], and its sample rate.

    Raises:
        FileNotFoundError: the path does not name a file.
        ValueError: the file cannot be decoded or holds no samples.
    """
    is_path = isinstance(path, (str, os.PathLike))
    name = str(path) if is_path else getattr(path, "name", f"<{type(path).__name__}>")
    if is_path and not Path(path).is_file():
        raise FileNotFoundError(f"audio file not found: {name}")
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)  # (samples, channels)
    except (RuntimeError, TypeError, soundfile.SoundFileError) as err:
        raise ValueError(f"could not decode audio file {name}: {err}") from err
    if data.shape[0] == 0:
        raise ValueError(f"audio file {name} holds no samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)  # (channels, samples)


class AudioPreprocess:
    """Decoded audio to the fixed-length mono float32 waveform ``(num_samples,)`` an encoder takes.

    Mixes channels to mono (their mean), resamples to ``sample_rate``, then crops or pads to
    exactly ``num_samples``.

    Args:
        sample_rate: target rate in Hz (the encoder's).
        clip_seconds: output length in seconds; give this or ``num_samples``.
        num_samples: output length in samples.
        random_crop: crop longer clips at a random offset (training); otherwise at ``crop_position``.
        crop_position: ``"center"`` or ``"start"``, where a deterministic crop is taken.
        pad_mode: ``"zero"`` appends silence to short clips, ``"repeat"`` loops them.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        clip_seconds: float | None = None,
        num_samples: int | None = None,
        random_crop: bool = False,
        crop_position: str = "center",
        pad_mode: str = "zero",
    ) -> None:
        if (clip_seconds is None) == (num_samples is None):
            raise ValueError("give exactly one of clip_seconds and num_samples")
        if num_samples is None:
            num_samples = round(clip_seconds * sample_rate)
        if num_samples <= 0 or sample_rate <= 0:
            raise ValueError(f"need a positive length and sample rate, got {num_samples} samples at {sample_rate} Hz")
        if crop_position not in ("center", "start"):
            raise ValueError(f"crop_position must be 'center' or 'start', got {crop_position!r}")
        if pad_mode not in ("zero", "repeat"):
            raise ValueError(f"pad_mode must be 'zero' or 'repeat', got {pad_mode!r}")
        self.sample_rate = int(sample_rate)
        self.num_samples = int(num_samples)
        self.random_crop = random_crop
        self.crop_position = crop_position
        self.pad_mode = pad_mode

    def __call__(self, waveform: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
        """Return a float32 ``(num_samples,)`` tensor.

        Args:
            waveform: ``(channels, samples)`` or ``(samples,)`` floating-point audio, as from ``load_audio``.
            sample_rate: the rate ``waveform`` was recorded at.
        """
        waveform = torch.as_tensor(waveform)
        if waveform.ndim not in (1, 2) or not waveform.is_floating_point():
            raise ValueError(
                f"AudioPreprocess expects a floating-point waveform of shape (channels, samples) or "
                f"(samples,), got shape {tuple(waveform.shape)} and dtype {waveform.dtype}"
            )
        if waveform.ndim == 2 and waveform.shape[0] > waveform.shape[1]:
            raise ValueError(
                f"AudioPreprocess expects shape (channels, samples), got {tuple(waveform.shape)}; "
                f"is it (samples, channels)? Transpose it"
            )
        if waveform.shape[-1] == 0:
            raise ValueError("AudioPreprocess got an empty waveform")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
        x = waveform.float()
        if x.ndim == 2:
            x = x.mean(dim=0)  # (samples,)
        if sample_rate != self.sample_rate:
            x = torchaudio.functional.resample(x, int(sample_rate), self.sample_rate)
        return self._fit_length(x).contiguous()

    def _fit_length(self, x: torch.Tensor) -> torch.Tensor:
        length, target = x.shape[0], self.num_samples
        if length > target:
            excess = length - target
            if self.random_crop:
                start = int(torch.randint(excess + 1, ()).item())
            else:
                start = excess // 2 if self.crop_position == "center" else 0
            return x[start : start + target]
        if length < target:
            if self.pad_mode == "repeat":
                return x.repeat(-(-target // length))[:target]
            return torch.nn.functional.pad(x, (0, target - length))
        return x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sample_rate={self.sample_rate}, num_samples={self.num_samples}, "
            f"random_crop={self.random_crop}, crop_position={self.crop_position!r}, "
            f"pad_mode={self.pad_mode!r})"
        )
