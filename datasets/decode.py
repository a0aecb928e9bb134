"""Robust decoding of images, captions and audio from files or raw bytes.

Every dataset decodes through these three functions, so a bad input is recognised the same way
whether it came from a CSV index, an image folder or a WebDataset shard. They raise
``SampleError(reason, detail)`` with one of the reason codes of ``polymodal.datasets.samples``;
the datasets turn that into a ``SkippedSample``. Unusual but valid inputs (palette images with
transparency, CMYK, 16-bit grey, stereo audio at another rate) are converted, not skipped.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import soundfile
import torch
from PIL import Image

from polymodal.media import AudioPreprocess, ToRGB, load_audio

from .samples import (
    BAD_ENCODING,
    CORRUPT_AUDIO,
    CORRUPT_IMAGE,
    EMPTY_AUDIO,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_FILE,
    NONFINITE_AUDIO,
    SILENT_AUDIO,
    TOO_MANY_PIXELS,
    ZERO_BYTES,
    SampleError,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "SampleError",
    "decode_audio",
    "decode_caption",
    "decode_image",
    "open_source",
]

# Pillow's own decompression-bomb limit (about 89.5 megapixels, 0.25 GB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485

_to_rgb = ToRGB()
# Register every Pillow plugin now: Image.open(formats=...) looks formats up before loading the
# plugins beyond the five most common, and raises KeyError for the rest.
Image.init()

# Pillow format names decode_image tries by default: what image-text data sets hold (JPEG covers
# multi-picture JPEGs too). A Pillow built without WebP simply leaves it out.
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM") if f in Image.OPEN)


def open_source(source: bytes | bytearray | memoryview | str | os.PathLike) -> tuple[BinaryIO, str]:
    """Open encoded bytes or a file for reading; return the stream and a name for messages.

    Raises:
        SampleError: ``missing_file`` for a path that is not a file, ``zero_bytes`` for empty data.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise SampleError(ZERO_BYTES, "<bytes> is empty (0 bytes)")
        return io.BytesIO(source), "<bytes>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
    name = os.fspath(source)
    try:
        stream = open(source, "rb")  # noqa: SIM115 -- the caller closes it
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise SampleError(MISSING_FILE, f"{name}: no such file") from err
    if os.fstat(stream.fileno()).st_size == 0:
        stream.close()
        raise SampleError(ZERO_BYTES, f"{name} is empty (0 bytes)")
    return stream, name


def decode_image(
    source: bytes | str | os.PathLike,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = IMAGE_FORMATS,
) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    The pixel count is read from the header and checked before any pixel is decoded, so a small
    file claiming huge dimensions costs nothing. Truncated files are rejected, not padded: this
    relies on Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` staying ``False`` (its default).

    Modes other than RGB are converted by ``polymodal.media.ToRGB`` (transparency composited on
    white, CMYK, 16-bit grey scaled); 32-bit float grey is scaled from [0, 1] when its values lie
    there, else clipped to 0-255.

    Args:
        source: encoded image bytes, or a path to an image file.
        max_pixels: largest accepted width * height; ``None`` for no limit of ours. Pillow refuses
            images over twice its own ``Image.MAX_IMAGE_PIXELS`` whatever this says; raise that too
            to accept such images.
        formats: Pillow format names to try; others are refused as ``corrupt_image``. The default
            covers photos and web images and leaves out formats with large attack surfaces (EPS
            runs Ghostscript, for one); ``None`` tries every format Pillow knows.

    Raises:
        SampleError: ``missing_file``, ``zero_bytes``, ``too_many_pixels`` or ``corrupt_image``.
    """
    if formats is not None:
        formats = tuple(f.upper() for f in formats)
        unknown = [f for f in formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"Pillow cannot open image formats {unknown}; it knows {sorted(Image.OPEN)}")
    stream, name = open_source(source)
    # Pillow warns (over MAX_IMAGE_PIXELS) or raises (over twice that) on large images while
    # opening or loading; the size limit is ours to enforce, so its warning must not turn into an
    # error under `-W error` or fire before our own check.
    with stream, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream, formats=formats)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise SampleError(CORRUPT_IMAGE, f"{name} has an empty size {width}x{height}")
            if max_pixels is not None and width * height > max_pixels:
                pixels = f"{width}x{height} = {width * height} pixels"
                raise SampleError(TOO_MANY_PIXELS, f"{name} is {pixels}, over max_pixels={max_pixels}")
            image.load()
        except SampleError:
            raise
        except Image.DecompressionBombError as err:
            raise SampleError(TOO_MANY_PIXELS, f"{name}: {err}") from err
        except Exception as err:
            # Decoders for the many formats Pillow reads fail with OSError, SyntaxError, ValueError,
            # struct.error, zlib errors...; a data pipeline must survive any of them.
            raise SampleError(CORRUPT_IMAGE, f"{name} could not be decoded: {type(err).__name__}: {err}") from err
    try:
        if image.mode == "F":
            return _float_to_rgb(image, name)
        return _to_rgb(image)
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(CORRUPT_IMAGE, f"{name} (mode {image.mode}) could not be converted to RGB: {err}") from err


def _float_to_rgb(image: Image.Image, name: str) -> Image.Image:
    # 32-bit float greyscale (TIFF) has no fixed range. Values within [0, 1] are taken as
    # intensities (the common convention); anything else as 0-255 levels, clipped. Pillow's own
    # conversion always clips, which turns a [0, 1] image black.
    grey = np.asarray(image, dtype=np.float64)
    if not np.isfinite(grey).all():
        raise SampleError(CORRUPT_IMAGE, f"{name} is a float image holding NaN or infinite pixels")
    if grey.size and grey.min() >= 0.0 and grey.max() <= 1.0:
        grey = grey * 255.0
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    # float("nan") and numpy's NaN scalars (numpy registers them as numbers.Real).
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and math.isnan(value):
        return True
    # pandas.NA and pandas.NaT, recognised without importing pandas.
    return type(value).__name__ in ("NAType", "NaTType")


def decode_caption(value: str | bytes | float | None) -> str:
    """Validate a caption and return it with surrounding whitespace stripped.

    Args:
        value: the caption as text, as UTF-8 bytes, or a missing value (``None``, ``NaN``, pandas' NA).

    Raises:
        SampleError: ``missing_caption``, ``bad_encoding`` (bytes that are not UTF-8, or text holding
            the lone surrogates that ``errors="surrogateescape"`` makes of such bytes) or ``empty_caption``.
    """
    if _is_missing(value):
        raise SampleError(MISSING_CAPTION, f"caption is missing ({value!r})")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(BAD_ENCODING, f"caption bytes are not valid UTF-8: {err}") from err
    elif isinstance(value, str):
        text = value
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise SampleError(BAD_ENCODING, f"caption is not valid UTF-8 text: {err}") from err
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        text = str(value)  # a caption that happens to be a number, e.g. "1984" parsed from JSON
    else:
        raise SampleError(MISSING_CAPTION, f"expected a text caption, got {type(value).__name__}")
    text = text.strip()
    if not text:
        raise SampleError(EMPTY_CAPTION, "caption is empty or whitespace only")
    return text


def decode_audio(
    source: bytes | str | os.PathLike,
    sample_rate: int,
    num_samples: int,
    random_crop: bool = False,
    silence_threshold: float = 1e-4,
) -> torch.Tensor:
    """Decode an audio file into a mono float32 waveform of exactly ``num_samples`` at ``sample_rate``.

    Channels are averaged, the audio is resampled, then cropped or zero-padded (``AudioPreprocess``).

    Args:
        source: encoded audio bytes (WAV, FLAC, OGG: whatever libsndfile reads), or a path.
        sample_rate: output rate in Hz.
        num_samples: output length.
        random_crop: crop long clips at a random offset (training) instead of the centre.
        silence_threshold: clips whose peak absolute amplitude is below this are skipped as silent.

    Raises:
        SampleError: ``missing_file``, ``zero_bytes``, ``corrupt_audio``, ``empty_audio``,
            ``nonfinite_audio`` or ``silent_audio``.
    """
    stream, name = open_source(source)
    with stream:
        try:
            waveform, rate = load_audio(stream)  # (channels, samples)
        except Exception as err:
            # load_audio refuses both undecodable and sample-less files with ValueError; the header
            # tells them apart. Anything else (a header claiming more frames than memory holds) is
            # equally a broken file, and must not stop the data pipeline.
            try:
                stream.seek(0)
                frames = soundfile.info(stream).frames
            except Exception:
                frames = None
            if frames == 0:
                raise SampleError(EMPTY_AUDIO, f"{name} holds no samples") from err
            raise SampleError(CORRUPT_AUDIO, f"{name}: {err}") from err
    if waveform.numel() == 0:
        raise SampleError(EMPTY_AUDIO, f"{name} holds no samples")
    if not torch.isfinite(waveform).all():
        bad = int((~torch.isfinite(waveform)).sum())
        raise SampleError(NONFINITE_AUDIO, f"{name} holds {bad} NaN or infinite values")
    peak = float(waveform.abs().max())
    if peak < silence_threshold:
        raise SampleError(SILENT_AUDIO, f"{name} is silent (peak amplitude {peak:.2e} < {silence_threshold:g})")
    preprocess = AudioPreprocess(sample_rate=sample_rate, num_samples=num_samples, random_crop=random_crop)
    try:
        return preprocess(waveform, rate)
    except ValueError as err:  # e.g. a header with a zero or fractional sample rate
        raise SampleError(CORRUPT_AUDIO, f"{name}: {err}") from err
