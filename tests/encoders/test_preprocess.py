"""Image and audio preprocessing: open_clip parity, mode conversion, mono/resample/crop, file decoding."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile
import torch
from open_clip.transform import image_transform as open_clip_image_transform
from PIL import Image

from polymodal.encoders.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AudioPreprocess,
    ToRGB,
    image_transform,
    load_audio,
)

# (height, width): landscape, portrait, square, much smaller than the target, extreme aspect ratios.
IMAGE_SHAPES = [(37, 50), (300, 200), (224, 224), (17, 9), (9, 17), (500, 31), (64, 1000)]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def rgb_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(ToRGB()(image))


# ------------------------------------------------------------------------------------------ images


def test_openai_constants_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert OPENAI_CLIP_MEAN == OPENAI_DATASET_MEAN
    assert OPENAI_CLIP_STD == OPENAI_DATASET_STD


@pytest.mark.parametrize("image_size", [32, (32, 48), (48, 32)])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize(("mean", "std"), [(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), (IMAGENET_MEAN, IMAGENET_STD)])
def test_eval_transform_equals_open_clip(image_size, resize_mode, mean, std):
    ours = image_transform(image_size, is_train=False, mean=mean, std=std, resize_mode=resize_mode)
    ref = open_clip_image_transform(image_size, is_train=False, mean=mean, std=std, resize_mode=resize_mode)
    expected_shape = (3, *((image_size, image_size) if isinstance(image_size, int) else image_size))
    for i, shape in enumerate(IMAGE_SHAPES):
        image = random_image(*shape, seed=i)
        out, want = ours(image), ref(image)
        assert out.shape == expected_shape
        assert out.dtype == torch.float32
        assert torch.equal(out, want), f"differs from open_clip for a {shape} image"


def test_eval_transform_equals_open_clip_bilinear_and_grayscale():
    ours = image_transform(40, is_train=False, interpolation="bilinear")
    ref = open_clip_image_transform(40, is_train=False, interpolation="bilinear")
    for i, shape in enumerate(IMAGE_SHAPES):
        image = random_image(*shape, seed=i)
        assert torch.equal(ours(image), ref(image))
        gray = image.convert("L")  # converted to RGB before resizing here, after it in open_clip
        assert torch.equal(ours(gray), ref(gray))
    # open_clip ignores interpolation for non-square sizes (always bicubic); here it is honoured.
    image = random_image(50, 70)
    bilinear = image_transform((24, 40), is_train=False, interpolation="bilinear")(image)
    bicubic = image_transform((24, 40), is_train=False, interpolation="bicubic")(image)
    assert bilinear.shape == bicubic.shape == (3, 24, 40)
    assert not torch.allclose(bilinear, bicubic)


@pytest.mark.parametrize("image_size", [32, (24, 40)])
def test_train_transform_equals_open_clip_with_same_seed(image_size):
    ours = image_transform(image_size, is_train=True)
    ref = open_clip_image_transform(image_size, is_train=True)
    expected_shape = (3, *((image_size, image_size) if isinstance(image_size, int) else image_size))
    for i, shape in enumerate(IMAGE_SHAPES):
        image = random_image(*shape, seed=i)
        torch.manual_seed(i)
        out = ours(image)
        torch.manual_seed(i)
        want = ref(image)
        assert out.shape == expected_shape
        assert torch.equal(out, want)


def test_train_transform_is_random_and_hflip_mirrors():
    image = random_image(80, 120)
    plain = image_transform(32, is_train=True, scale=(0.3, 1.0))
    flipping = image_transform(32, is_train=True, scale=(0.3, 1.0), hflip=True)
    torch.manual_seed(0)
    a = plain(image)
    b = plain(image)
    assert not torch.equal(a, b)
    flipped = unflipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        base = plain(image)
        torch.manual_seed(seed)
        out = flipping(image)
        if torch.equal(out, base):
            unflipped += 1
        else:
            assert torch.equal(out, base.flip(-1))
            flipped += 1
    assert flipped > 0 and unflipped > 0


def test_color_jitter_changes_colours_but_not_shape():
    image = random_image(40, 40)
    jitter = image_transform(32, is_train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.4)
    plain = image_transform(32, is_train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(0)
    out = jitter(image)
    assert out.shape == (3, 32, 32)
    assert not torch.allclose(out, plain(image))


def test_transforms_pickle():
    image = random_image(50, 37)
    for transform in (
        image_transform(32, False),
        image_transform((24, 40), True, hflip=True, color_jitter=0.2),
    ):
        clone = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(0)
        a = transform(image)
        torch.manual_seed(0)
        assert torch.equal(a, clone(image))


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        image_transform(32, False, interpolation="cubic")
    with pytest.raises(ValueError, match="resize_mode"):
        image_transform(32, False, resize_mode="crop")
    with pytest.raises(ValueError, match="pair"):
        image_transform((32, 32, 3), False)
    with pytest.raises(TypeError, match="PIL image"):
        ToRGB()(torch.zeros(3, 4, 4))


def test_rgb_image_unchanged():
    image = random_image(10, 12)
    assert np.array_equal(rgb_pixels(image), np.asarray(image))


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    rgba[0, 0] = [10, 20, 30, 255]  # opaque
    rgba[0, 1] = [0, 0, 0, 128]  # half-transparent black over white: mid grey
    out = rgb_pixels(Image.fromarray(rgba, "RGBA"))
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [127, 127, 127]
    assert (out[1:] == 255).all()
    assert (out[0, 2:] == 255).all()
    # The whole transform, too: a fully transparent image normalises to white, not black.
    tensor = image_transform(8, False)(Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA"))
    white = (1.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(tensor, white.view(3, 1, 1).expand(3, 8, 8))


def test_other_transparent_modes_and_background():
    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], axis=-1)
    assert rgb_pixels(Image.fromarray(la, "LA")).tolist() == [[[255] * 3, [50] * 3]] * 2

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 1  # palette index 1 (blue) is transparent
    assert rgb_pixels(palette).tolist() == [[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 0, 0]]]

    rgba = Image.fromarray(np.zeros((2, 2, 4), np.uint8), "RGBA")
    assert (np.asarray(ToRGB(background=(0, 128, 0))(rgba)) == [0, 128, 0]).all()


def test_cmyk_converts_multiplicatively():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 0, 0, 255], [128, 0, 64, 128]]], np.uint8)
    out = rgb_pixels(Image.fromarray(cmyk, "CMYK"))
    # R = (255 - C) * (255 - K) / 255, likewise G with M and B with Y.
    assert out.tolist() == [[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [63, 127, 95]]]


@pytest.mark.parametrize(("dtype", "mode"), [(np.uint16, "I;16"), (np.int32, "I")])
def test_16bit_grayscale_scales_to_8bit(dtype, mode):
    values = np.array([[0, 65535], [257 * 100, 1000]], dtype=dtype)
    image = Image.fromarray(values)
    assert image.mode == mode
    out = rgb_pixels(image)
    assert out[..., 0].tolist() == [[0, 255], [100, 4]]
    assert (out[..., 0:1] == out).all()  # grey: all channels equal


def test_16bit_png_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    values = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        out = image_transform(16, False, mean=0.0, std=1.0)(image)
    assert torch.allclose(out[0], torch.from_numpy(np.rint(values / 257.0) / 255.0).float(), atol=1e-6)


# ------------------------------------------------------------------------------------------- audio


def sine(freq: float, sample_rate: int, seconds: float) -> torch.Tensor:
    t = torch.arange(round(sample_rate * seconds), dtype=torch.float64) / sample_rate
    return torch.sin(2 * torch.pi * freq * t).float()


def peak_frequency(x: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(x.double()).abs()
    return spectrum.argmax().item() * sample_rate / x.shape[-1]


def test_stereo_mixes_to_channel_mean():
    torch.manual_seed(0)
    stereo = torch.randn(2, 1000)
    out = AudioPreprocess(sample_rate=8000, num_samples=1000)(stereo, 8000)
    assert out.shape == (1000,) and out.dtype == torch.float32
    assert torch.allclose(out, stereo.mean(dim=0))
    mono = torch.randn(1000)
    assert torch.equal(AudioPreprocess(8000, num_samples=1000)(mono, 8000), mono)


def test_resampling_keeps_length_and_frequency():
    x = torch.stack([sine(440.0, 44100, 1.0), sine(440.0, 44100, 1.0)])
    out = AudioPreprocess(sample_rate=16000, clip_seconds=1.0)(x, 44100)
    assert out.shape == (16000,)
    assert abs(peak_frequency(out, 16000) - 440.0) <= 1.0
    assert out.abs().max() > 0.95  # amplitude preserved, no zero padding needed
    assert out[-100:].abs().max() > 0.5
    # Longer target: the resampled clip itself is exactly 16000 samples, then zero padded.
    padded = AudioPreprocess(sample_rate=16000, num_samples=20000)(x, 44100)
    assert padded[16000:].abs().max() == 0 and padded[15900:16000].abs().max() > 0.5
    high = AudioPreprocess(16000, clip_seconds=0.5)(sine(3000.0, 22050, 0.5), 22050)
    assert abs(peak_frequency(high, 16000) - 3000.0) <= 2.0


def test_zero_and_repeat_padding():
    x = torch.arange(1, 11, dtype=torch.float32)
    zero = AudioPreprocess(100, num_samples=25, pad_mode="zero")(x, 100)
    assert zero.shape == (25,)
    assert torch.equal(zero[:10], x) and (zero[10:] == 0).all()
    repeat = AudioPreprocess(100, num_samples=25, pad_mode="repeat")(x, 100)
    assert torch.equal(repeat, torch.cat([x, x, x[:5]]))
    assert AudioPreprocess(100, clip_seconds=0.25)(x, 100).shape == (25,)


def test_crop_positions():
    x = torch.arange(100, dtype=torch.float32)
    assert torch.equal(AudioPreprocess(100, num_samples=10)(x, 100), x[45:55])
    assert torch.equal(AudioPreprocess(100, num_samples=10, crop_position="start")(x, 100), x[:10])
    crop = AudioPreprocess(100, num_samples=10, random_crop=True)
    torch.manual_seed(0)
    starts = set()
    for _ in range(20):
        out = crop(x, 100)
        start = int(out[0])
        assert torch.equal(out, x[start : start + 10])
        starts.add(start)
    assert len(starts) > 5


def test_audio_preprocess_rejects_bad_input():
    pre = AudioPreprocess(16000, num_samples=100)
    with pytest.raises(ValueError, match=r"\(channels, samples\)"):
        pre(torch.zeros(1000, 2), 16000)
    with pytest.raises(ValueError, match="floating-point"):
        pre(torch.zeros(2, 1000, dtype=torch.int16), 16000)
    with pytest.raises(ValueError, match="floating-point"):
        pre(torch.zeros(1, 2, 1000), 16000)
    with pytest.raises(ValueError, match="empty"):
        pre(torch.zeros(0), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        pre(torch.zeros(100), 0)
    with pytest.raises(ValueError, match="exactly one"):
        AudioPreprocess(16000)
    with pytest.raises(ValueError, match="pad_mode"):
        AudioPreprocess(16000, num_samples=10, pad_mode="reflect")


def test_audio_preprocess_pickles():
    pre = AudioPreprocess(16000, clip_seconds=0.1, pad_mode="repeat")
    clone = pickle.loads(pickle.dumps(pre))
    x = torch.randn(2, 1234)
    assert torch.equal(clone(x, 22050), pre(x, 22050))


@pytest.mark.parametrize(
    ("suffix", "subtype", "atol"),
    [("wav", "FLOAT", 0.0), ("wav", "PCM_16", 1 / 32768), ("flac", "PCM_16", 1 / 32768)],
)
def test_load_audio_round_trip(tmp_path, suffix, subtype, atol):
    rng = np.random.default_rng(0)
    data = (rng.uniform(-0.9, 0.9, size=(1200, 2))).astype(np.float32)  # soundfile: (samples, channels)
    path = tmp_path / f"clip.{suffix}"
    soundfile.write(path, data, 22050, subtype=subtype)
    waveform, sample_rate = load_audio(path)
    assert sample_rate == 22050
    assert waveform.shape == (2, 1200) and waveform.dtype == torch.float32
    assert torch.allclose(waveform, torch.from_numpy(data.T), atol=atol, rtol=0)
    from_bytes, _ = load_audio(io.BytesIO(path.read_bytes()))
    assert torch.equal(from_bytes, waveform)
    assert load_audio(str(path))[0].shape == (2, 1200)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"definitely not audio" * 10)
    with pytest.raises(ValueError, match="could not decode.*garbage.wav"):
        load_audio(garbage)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(ValueError, match="no samples"):
        load_audio(empty)
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path)  # a directory
