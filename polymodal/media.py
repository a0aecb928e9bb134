"""Decoded images and audio made uniform: RGB conversion, audio file loading, mono resampling to a length.

A leaf of the package (it imports nothing from polymodal), because both the data pipeline
(``polymodal.datasets``, which decodes) and the encoders' preprocessing (``polymodal.encoders``,
which the model's transforms are built from) need exactly these conversions, and neither layer may
import the other. Import them from ``polymodal.encoders`` as before; they are defined here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image

__all__ = ["AudioPreprocess", "ToRGB", "load_audio"]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


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
