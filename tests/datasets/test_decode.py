"""decode_image / decode_caption / decode_audio: every bad input is refused with its reason,
every unusual but valid input is converted."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageFile

from polymodal.datasets.decode import decode_audio, decode_caption, decode_image
from polymodal.datasets.samples import SampleError


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` 1-bit pixels whose pixel data is a few bytes of zeros.

    Decoding it would fail (the data is far too short), so a ``too_many_pixels`` verdict proves the
    size was checked from the header alone.
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def _reason(fn, *args, **kwargs) -> str:
    with pytest.raises(SampleError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# ------------------------------------------------------------------------------------------- images


def test_valid_rgb_image_from_path_and_bytes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(pixels))
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png")):
        image = decode_image(source)
        assert image.mode == "RGB" and image.size == (5, 6)
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_missing_and_zero_byte_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(decode_image, tmp_path / "nope.jpg") == "missing_file"
    assert _reason(decode_image, tmp_path / "empty.jpg") == "zero_bytes"
    assert _reason(decode_image, b"") == "zero_bytes"


def test_truncated_and_garbage_images_are_corrupt():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the check below relies on Pillow's default
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    noise.save(jpeg, "JPEG", quality=95)
    jpeg = jpeg.getvalue()
    png = _png_bytes(noise)
    assert decode_image(jpeg).size == (64, 64)  # the untruncated file is fine
    assert _reason(decode_image, jpeg[: len(jpeg) // 2]) == "corrupt_image"
    assert _reason(decode_image, jpeg[: len(jpeg) - 30]) == "corrupt_image"
    assert _reason(decode_image, png[: len(png) // 2]) == "corrupt_image"
    assert _reason(decode_image, b"this is not an image at all") == "corrupt_image"


def test_huge_dimensions_are_refused_from_the_header_without_warnings():
    huge = _png_header_only(10_000, 10_000)  # 1e8 pixels: over the default limit, under Pillow's error limit
    assert len(huge) < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(SampleError) as info:
            decode_image(huge)
    assert info.value.reason == "too_many_pixels"
    assert "10000x10000" in info.value.detail
    # Over twice Pillow's own limit Pillow raises DecompressionBombError while opening; that too
    # must come back as too_many_pixels, even when our limit is higher.
    assert _reason(decode_image, _png_header_only(20_000, 20_000), max_pixels=10**9) == "too_many_pixels"
    # The limit is ours to set.
    small = _png_bytes(Image.new("RGB", (40, 30)))
    assert _reason(decode_image, small, max_pixels=1000) == "too_many_pixels"
    assert decode_image(small, max_pixels=1200).size == (40, 30)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)  # index 0 black (transparent), index 1 red
    image.putpixel((3, 1), 1)
    decoded = np.asarray(decode_image(_png_bytes(image, transparency=0)))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[1, 3].tolist() == [200, 10, 10]


def test_la_and_rgba_are_composited_on_white():
    la = Image.new("LA", (3, 3), (0, 0))  # black, fully transparent
    la.putpixel((1, 1), (100, 255))
    decoded = np.asarray(decode_image(_png_bytes(la)))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[1, 1].tolist() == [100, 100, 100]

    rgba = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    rgba.putpixel((2, 0), (10, 20, 30, 255))
    rgba.putpixel((0, 2), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    decoded = np.asarray(decode_image(_png_bytes(rgba)))
    assert decoded[1, 1].tolist() == [255, 255, 255]
    assert decoded[0, 2].tolist() == [10, 20, 30]
    assert np.all(np.abs(decoded[2, 0].astype(int) - 127) <= 1)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG", quality=100)
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB"
    red = np.asarray(decoded)[8, 8].astype(int)
    assert np.all(np.abs(red - [255, 0, 0]) <= 8), red


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(decode_image(_png_bytes(image)))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]
    assert (decoded == decoded[..., :1]).all()  # grey stays grey


def test_one_bit_image_becomes_rgb():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    decoded = np.asarray(decode_image(_png_bytes(image)))
    assert decoded.tolist() == [[[0, 0, 0], [255, 255, 255]]]


# ----------------------------------------------------------------------------------------- captions


def test_valid_captions_are_stripped_and_decoded():
    assert decode_caption("  a cat on a mat \n") == "a cat on a mat"
    assert decode_caption("caf\u00e9".encode()) == "caf\u00e9"
    assert decode_caption(b"\tdog ") == "dog"
    assert decode_caption(1984) == "1984"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing_caption"),
        (float("nan"), "missing_caption"),
        (np.float32("nan"), "missing_caption"),
        (["a", "list"], "missing_caption"),
        ("", "empty_caption"),
        ("  \t\n ", "empty_caption"),
        (b"   ", "empty_caption"),
        (b"\xff\xfe caption in latin-1 \xe9", "bad_encoding"),
        ("bad byte kept by surrogateescape: \udce9", "bad_encoding"),
    ],
)
def test_bad_captions_are_refused(value, reason):
    assert _reason(decode_caption, value) == reason


# -------------------------------------------------------------------------------------------- audio


def _wav(path, data: np.ndarray, rate: int, subtype: str | None = None, format: str = "WAV"):
    soundfile.write(path, data, rate, subtype=subtype, format=format)
    return path


def test_valid_mono_audio_passes_through(tmp_path):
    wave = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    path = _wav(tmp_path / "a.wav", wave, 16000, "FLOAT")
    for source in (path, path.read_bytes()):
        out = decode_audio(source, sample_rate=16000, num_samples=16000)
        assert out.shape == (16000,) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), wave, atol=1e-6)


def test_stereo_44k_becomes_mono_16k_of_the_requested_length(tmp_path):
    rate, seconds, freq = 44100, 0.5, 440.0
    t = np.arange(int(rate * seconds)) / rate
    left = 0.8 * np.sin(2 * np.pi * freq * t)
    stereo = np.stack([left, 0.5 * left], axis=1).astype(np.float32)  # (samples, channels)
    path = _wav(tmp_path / "stereo.wav", stereo, rate, "FLOAT")

    out = decode_audio(path, sample_rate=16000, num_samples=16000)  # 1 s: 0.5 s of audio then padding
    assert out.shape == (16000,)
    body = out[:7900].numpy()
    assert abs(np.abs(body[200:-200]).max() - 0.6) < 0.02  # the mean of 0.8 and 0.4
    assert torch.count_nonzero(out[8100:]) == 0  # zero padding after the 8000 resampled samples
    spectrum = np.abs(np.fft.rfft(body))
    peak_hz = spectrum.argmax() * 16000 / len(body)
    assert abs(peak_hz - freq) < 5  # resampled, not just relabelled

    cropped = decode_audio(path, sample_rate=16000, num_samples=4000)
    assert cropped.shape == (4000,)


def test_bad_audio_is_refused_with_its_reason(tmp_path):
    tone = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    empty = _wav(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    silent = _wav(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    whisper = _wav(tmp_path / "whisper.wav", np.full(8000, 1e-6, np.float32), 16000, "FLOAT")
    with_nan = tone.copy()
    with_nan[100] = np.nan
    nan = _wav(tmp_path / "nan.wav", with_nan, 16000, "FLOAT")
    with_inf = tone.copy()
    with_inf[7] = np.inf
    inf = _wav(tmp_path / "inf.wav", with_inf, 16000, "FLOAT")
    flac = _wav(tmp_path / "ok.flac", tone, 16000, format="FLAC").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (tmp_path / "zero.wav").write_bytes(b"")

    def reason(path):
        return _reason(decode_audio, path, sample_rate=16000, num_samples=8000)

    assert decode_audio(flac, 16000, 8000).shape == (8000,)  # the untruncated flac is fine
    assert reason(empty) == "empty_audio"
    assert reason(silent) == "silent_audio"
    assert reason(whisper) == "silent_audio"
    assert reason(nan) == "nonfinite_audio"
    assert reason(inf) == "nonfinite_audio"
    assert reason(tmp_path / "truncated.flac") == "corrupt_audio"
    assert reason(b"RIFF\x00\x00\x00\x00WAVEfmt not really a wav file") == "corrupt_audio"
    assert reason(tmp_path / "zero.wav") == "zero_bytes"
    assert reason(tmp_path / "missing.wav") == "missing_file"
    # The threshold is a parameter: the whisper passes a lower one.
    assert decode_audio(whisper, 16000, 8000, silence_threshold=1e-7).shape == (8000,)


def test_sample_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(SampleError("corrupt_image", "x.jpg is broken")))
    assert (err.reason, err.detail) == ("corrupt_image", "x.jpg is broken")


def test_only_listed_image_formats_are_opened():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, "TGA")
    tga = buffer.getvalue()
    assert _reason(decode_image, tga) == "corrupt_image"  # not a format image-text data should hold
    assert np.asarray(decode_image(tga, formats=("tga",)))[0, 0].tolist() == [1, 2, 3]
    assert decode_image(tga, formats=None).size == (4, 4)
    with pytest.raises(ValueError, match="NOT_A_FORMAT"):
        decode_image(tga, formats=("not_a_format",))


def test_float_grey_tiff_is_scaled_when_in_unit_range():
    def tiff(values) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.array([values], np.float32)).save(buffer, "TIFF")
        return buffer.getvalue()

    assert np.asarray(decode_image(tiff([0.0, 0.5, 1.0])))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(decode_image(tiff([0.0, 100.0, 300.0])))[0, :, 0].tolist() == [0, 100, 255]
    assert _reason(decode_image, tiff([0.0, float("nan")])) == "corrupt_image"
