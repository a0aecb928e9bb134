"""The built-in synthetic data: determinism, labels that match the content, unseen combinations, writers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.datasets.samples import collate_samples
from polymodal.datasets.synthetic import MANIFEST_NAME, write_synthetic
from polymodal.datasets.synthetic_shapes import (
    COLOUR_RGB,
    COLOURS,
    SEEN_COMBOS,
    SHAPES,
    UNSEEN_COMBOS,
    ShapesDataset,
    colour_prompts,
    combo_prompts,
    hard_negative_captions,
    make_shape_sample,
    shape_prompts,
    single_shape_captions,
)
from polymodal.datasets.synthetic_tones import (
    TONE_PATTERNS,
    TONE_PITCH_BANDS,
    TONE_PITCHES,
    TONE_WAVEFORMS,
    UNSEEN_TONE_COMBOS,
    TonesDataset,
    make_tone_sample,
    tone_prompts,
)


def to_tensor(image: Image.Image) -> torch.Tensor:
    # Module level, so DataLoader workers can unpickle it under any start method.
    return torch.from_numpy(np.array(image))


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


def foreground(image: np.ndarray) -> np.ndarray:
    """Mask of pixels clearly away from the background (the median colour of the border)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    distance = np.abs(image.astype(np.float32) - np.median(border, axis=0)).sum(-1)
    return distance > 60


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.square(rgb - np.asarray(COLOUR_RGB[c], np.float32)).sum()))


# ---------------------------------------------------------------------------------------------- shapes


def test_shapes_are_deterministic_and_seed_dependent():
    for split in ("train", "heldout"):
        for index in (0, 7, 123456):
            a, b = make_shape_sample(index, split, seed=3), make_shape_sample(index, split, seed=3)
            np.testing.assert_array_equal(pixels(a), pixels(b))
            assert a.caption == b.caption and a.attrs == b.attrs
    differ = [
        not np.array_equal(pixels(make_shape_sample(i, seed=0)), pixels(make_shape_sample(i, seed=1)))
        for i in range(10)
    ]
    assert all(differ)
    # Same index in the two splits is not the same image either.
    assert not np.array_equal(pixels(make_shape_sample(1, "train")), pixels(make_shape_sample(1, "heldout")))


def test_shapes_dataset_is_independent_of_access_order_and_workers():
    ds = ShapesDataset("train", n=12, seed=5, transform=np.asarray)
    forward = [ds[i] for i in range(12)]
    backward = [ds[i] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["meta"] == b["meta"]
    np.testing.assert_array_equal(ds[-1]["image"], forward[-1]["image"])
    with pytest.raises(IndexError):
        ds[12]

    tensors = ShapesDataset("train", n=12, seed=5, transform=to_tensor)
    loader = DataLoader(tensors, batch_size=5, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    images = torch.cat([b.inputs["image"] for b in batches])
    np.testing.assert_array_equal(images.numpy(), np.stack([f["image"] for f in forward]))
    assert [m["caption"] for b in batches for m in b.meta] == [f["meta"]["caption"] for f in forward]


def test_shapes_dataset_item_with_transform_and_tokenizer():
    from polymodal.encoders import CLIPTokenizer

    tokenizer = CLIPTokenizer(context_length=32)
    ds = ShapesDataset("heldout", n=4, seed=0, image_size=32, transform=to_tensor, tokenizer=tokenizer)
    item = ds[2]
    assert item["image"].shape == (32, 32, 3)
    assert item["text"].shape == (32,) and item["text"].dtype == torch.long
    torch.testing.assert_close(item["text"], tokenizer([item["meta"]["caption"]])[0])
    json.dumps(item["meta"])  # JSON-able
    assert {"caption", "shape", "colour", "size", "position", "num_shapes", "shapes", "unseen"} <= set(item["meta"])
    plain = ShapesDataset("train", n=2)[0]
    assert isinstance(plain["image"], Image.Image) and plain["image"].size == (64, 64) and "text" not in plain


def test_shape_colour_position_and_size_are_really_drawn():
    areas: dict[tuple[str, str], list[int]] = {}
    for index in range(240):
        sample = make_shape_sample(index, "heldout", seed=1)
        image = pixels(sample)
        mask = foreground(image)
        assert mask.any(), sample.caption
        colour = nearest_colour(image[mask].astype(np.float32).mean(0))
        assert colour == sample.attrs["colour"], (index, sample.caption)
        ys, xs = np.nonzero(mask)
        position = sample.attrs["position"]
        for coord, (low_word, high_word) in ((xs.mean(), ("left", "right")), (ys.mean(), ("top", "bottom"))):
            if low_word in position:
                assert coord < 27, (index, position, coord)
            elif high_word in position:
                assert coord > 35, (index, position, coord)
            else:
                assert abs(coord - 31.5) < 5, (index, position, coord)
        areas.setdefault((sample.attrs["shape"], sample.attrs["size"]), []).append(int(mask.sum()))
    for shape in SHAPES:
        assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape


def test_two_shape_images_show_both_colours_in_their_halves():
    checked = 0
    for index in range(300):
        sample = make_shape_sample(index, "train", seed=2, two_shape_share=0.2)
        if sample.attrs["num_shapes"] != 2:
            continue
        image = pixels(sample)
        first, second = sample.attrs["shapes"]
        horizontal = first["position"] == "left"
        halves = (image[:, :32], image[:, 32:]) if horizontal else (image[:32], image[32:])
        for half, s in zip(halves, (first, second)):
            mask = foreground(half)
            assert nearest_colour(half[mask].astype(np.float32).mean(0)) == s["colour"], (index, sample.caption)
        assert sample.attrs["shape"] is None and sample.attrs["colour"] is None
        checked += 1
    assert checked > 30


def test_train_never_shows_an_unseen_combination():
    combos, two_shapes = Counter(), 0
    for index in range(3000):
        attrs = make_shape_sample(index, "train", seed=0, two_shape_share=0.2).attrs
        assert not attrs["unseen"]
        for s in attrs["shapes"]:
            assert (s["shape"], s["colour"]) not in UNSEEN_COMBOS, (index, attrs)
            combos[s["shape"], s["colour"]] += 1
        two_shapes += attrs["num_shapes"] == 2
    assert set(combos) == set(SEEN_COMBOS)
    assert 0.17 < two_shapes / 3000 < 0.23
    # Two-shape images are opt-in.
    assert all(make_shape_sample(i, "train").attrs["num_shapes"] == 1 for i in range(200))


def test_unseen_combinations_cover_each_attribute_sparingly():
    assert len(UNSEEN_COMBOS) == 8 and len(set(UNSEEN_COMBOS)) == 8
    shapes, colours = Counter(s for s, _ in UNSEEN_COMBOS), Counter(c for _, c in UNSEEN_COMBOS)
    assert set(colours) == set(COLOURS) and max(colours.values()) == 1
    assert max(shapes.values()) <= 2
    assert len(SEEN_COMBOS) + len(UNSEEN_COMBOS) == len(SHAPES) * len(COLOURS)


def test_heldout_has_a_third_unseen_single_shapes():
    samples = [make_shape_sample(i, "heldout", seed=4) for i in range(300)]
    assert all(s.attrs["num_shapes"] == 1 for s in samples)
    unseen = [i for i, s in enumerate(samples) if s.attrs["unseen"]]
    assert unseen == list(range(0, 300, 3))
    assert all((s.attrs["shape"], s.attrs["colour"]) in UNSEEN_COMBOS for s in samples[::3])
    assert {(s.attrs["shape"], s.attrs["colour"]) for s in samples[::3]} == set(UNSEEN_COMBOS)
    # Held-out captions use the training templates; `mentions` says exactly what each one states.
    seen_mentions = set()
    for s in samples:
        a, words = s.attrs, set(re.findall(r"[a-z]+", s.caption))
        assert {"shape", "colour"} <= set(a["mentions"]) and a["shape"] in words and a["colour"] in words
        assert ("size" in a["mentions"]) == bool(words & {"small", "large"}), s.caption
        assert ("size" not in a["mentions"]) or a["size"] in words
        states_position = bool(words & {"left", "right", "top", "bottom", "centre"})
        assert ("position" in a["mentions"]) == states_position, s.caption
        if states_position:
            assert a["position"] in s.caption
        seen_mentions.add(tuple(a["mentions"]))
    assert len(seen_mentions) == 4  # colour and shape only; + size; + position; + both


def test_captions_name_every_shape_and_colour_in_varied_wording():
    skeletons = set()
    for index in range(1000):
        sample = make_shape_sample(index, "train", seed=0, two_shape_share=0.3)
        words = set(re.findall(r"[a-z]+", sample.caption))
        for s in sample.attrs["shapes"]:
            assert s["shape"] in words and s["colour"] in words, sample.caption
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou ]", sample.caption), sample.caption
        skeleton = sample.caption
        for word in (*SHAPES, *COLOURS, "small", "large"):
            skeleton = re.sub(rf"\b{word}\b", "_", skeleton)
        skeletons.add(re.sub(r"\ban? _", "a _", skeleton))
    assert len(skeletons) >= 12


def _stated(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) of each object a caption states, in order (single-shape templates may name the
    shape first: "a square coloured blue")."""
    colours = re.findall(rf"\b({'|'.join(COLOURS)})\b", caption)
    shapes = re.findall(rf"\b({'|'.join(SHAPES)})\b", caption)
    assert len(colours) == len(shapes), caption
    return list(zip(colours, shapes))


def test_hard_negatives_are_close_to_the_caption_and_wrong():
    from polymodal.datasets.synthetic import sample_rng

    kinds = Counter()
    for index in range(600):
        sample = make_shape_sample(index, "train", seed=1, image_size=32, two_shape_share=0.5)
        rng = sample_rng("shapes-negatives", 1, "train", index)
        negatives = hard_negative_captions(sample.caption, sample.attrs, 3, rng)
        assert len(negatives) == 3 and sample.caption not in negatives
        true = [(s["colour"], s["shape"]) for s in sample.attrs["shapes"]]
        for negative in negatives:
            stated = _stated(negative)
            assert len(stated) == len(true)
            if len(true) == 1:
                # one thing changed, and no template gives this image that caption
                s = sample.attrs["shapes"][0]
                assert negative not in single_shape_captions(s["shape"], s["colour"], s["size"], s["position"])
                assert (stated[0][0] == true[0][0]) != (stated[0][1] == true[0][1])
                kinds["colour" if stated[0][1] == true[0][1] else "shape"] += 1
            elif stated == _stated(sample.caption)[::-1]:
                assert " to the left of " in negative or " above " in negative  # the order carries meaning
                kinds["swap"] += 1
            else:
                assert set(stated) != set(true)  # another pair of objects than the image shows
                kinds["pair attribute"] += 1
        if " to the left of " in sample.caption or " above " in sample.caption:
            assert _stated(negatives[0]) == _stated(sample.caption)[::-1]  # the swap comes first
    assert min(kinds.values()) > 30 and set(kinds) == {"colour", "shape", "swap", "pair attribute"}


def test_shapes_dataset_hard_negatives_leave_the_samples_unchanged():
    from polymodal.encoders import CLIPTokenizer

    tokenizer = CLIPTokenizer(context_length=16)
    plain = ShapesDataset("train", n=6, seed=2, image_size=32, transform=to_tensor, tokenizer=tokenizer)
    negs = ShapesDataset(
        "train", n=6, seed=2, image_size=32, transform=to_tensor, tokenizer=tokenizer, hard_negatives=2
    )
    for i in range(6):
        a, b = plain[i], negs[i]
        assert np.array_equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
        assert b["text_negatives"].shape == (2, 16)
        assert torch.equal(b["text_negatives"], tokenizer(b["meta"]["hard_negatives"]))
        assert torch.equal(negs[i]["text_negatives"], b["text_negatives"])  # deterministic
    with pytest.raises(ValueError, match="hard_negatives must be a non-negative integer"):
        ShapesDataset(n=2, tokenizer=tokenizer, hard_negatives=-1)
    with pytest.raises(ValueError, match="hard_negatives needs a tokenizer"):
        ShapesDataset(n=2, hard_negatives=1)


def test_shape_prompt_helpers():
    names, templates = shape_prompts()
    assert names == list(SHAPES) and len(templates) == len(COLOURS)
    assert "an orange {}" in templates and "a red {}" in templates
    names, templates = colour_prompts()
    assert names == list(COLOURS) and templates[0].format("red") == "red circle"
    names, templates = combo_prompts()
    assert len(names) == 48 and "purple circle" in names and templates == ["{}"]
    for template in shape_prompts()[1] + colour_prompts()[1]:
        assert template.count("{}") == 1


def test_shape_generation_is_fast():
    start = time.perf_counter()
    for index in range(1000):
        make_shape_sample(index, "train", seed=0)
    assert time.perf_counter() - start < 5.0


def test_bad_shape_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        make_shape_sample(0, "test")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=8)
    with pytest.raises(ValueError, match="n must"):
        ShapesDataset(n=0)
    with pytest.raises(ValueError, match="seed"):
        make_shape_sample(0, seed=-1)


# ----------------------------------------------------------------------------------------------- tones


def spectrum_peak(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


def harmonic_levels(audio: np.ndarray, rate: int, f0: float) -> list[float]:
    """Magnitudes of harmonics 1-3 relative to the fundamental."""
    # Zero-padded 8x, so a harmonic between two bins loses at most a few percent of its height.
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio)), n=8 * len(audio)))
    bin_hz = rate / (8 * len(audio))
    levels = []
    for k in (1, 2, 3):
        centre = int(round(k * f0 / bin_hz))
        levels.append(float(spectrum[centre - 24 : centre + 25].max()))
    return [level / levels[0] for level in levels]


def test_tones_are_deterministic_and_seed_dependent():
    for split in ("train", "heldout"):
        a, b = make_tone_sample(42, split, seed=1), make_tone_sample(42, split, seed=1)
        np.testing.assert_array_equal(a.audio, b.audio)
        assert a.caption == b.caption and a.attrs == b.attrs
    assert all(not np.array_equal(make_tone_sample(i).audio, make_tone_sample(i, seed=9).audio) for i in range(10))
    ds = TonesDataset("train", n=6, seed=2)
    forward = [ds[i]["audio"] for i in range(6)]
    for i in reversed(range(6)):
        torch.testing.assert_close(ds[i]["audio"], forward[i], rtol=0, atol=0)


def test_tone_pitch_waveform_and_pattern_are_really_there():
    rate = 16000
    for index in range(150):
        sample = make_tone_sample(index, "train", seed=0)
        a, audio = sample.attrs, sample.audio
        assert audio.dtype == np.float32 and audio.shape == (rate,) and np.abs(audio).max() <= 1.0
        low, high = TONE_PITCH_BANDS[a["pitch"]]
        assert low <= spectrum_peak(audio, rate) <= high, (index, a)
        quarter = rate // 4
        first, last = spectrum_peak(audio[:quarter], rate), spectrum_peak(audio[-quarter:], rate)
        if a["pattern"] == "rising":
            assert last > first * 1.15, (index, a)
        elif a["pattern"] == "falling":
            assert first > last * 1.15, (index, a)
        else:
            assert abs(first - last) < 10, (index, a)
            second, third = harmonic_levels(audio, rate, a["start_hz"])[1:]
            expected = {"sine": (0, 0), "square": (0, 1 / 3), "sawtooth": (1 / 2, 1 / 3), "triangle": (0, 1 / 9)}
            # Pulsing smears the lines a little, hence the loose tolerance around the textbook ratios.
            assert second == pytest.approx(expected[a["waveform"]][0], abs=0.06), (index, a)
            assert third == pytest.approx(expected[a["waveform"]][1], abs=0.06), (index, a)
        frames = np.sqrt(np.square(audio[320:-320].reshape(-1, 160)).mean(1))  # 10 ms RMS, fades left out
        quiet = float((frames < 0.1 * frames.max()).mean())
        if a["pattern"] == "pulsing":
            assert 0.25 < quiet < 0.75, (index, a)
        else:
            assert quiet == 0.0, (index, a)


def test_tone_splits_and_unseen_combinations():
    combos = Counter()
    for index in range(1500):
        a = make_tone_sample(index, "train", seed=0).attrs
        assert (a["waveform"], a["pattern"]) not in UNSEEN_TONE_COMBOS and not a["unseen"]
        combos[a["waveform"], a["pattern"], a["pitch"]] += 1
    assert len(combos) == (16 - len(UNSEEN_TONE_COMBOS)) * 3
    held = [make_tone_sample(i, "heldout", seed=0).attrs for i in range(120)]
    assert [i for i, a in enumerate(held) if a["unseen"]] == list(range(0, 120, 3))
    assert {(a["waveform"], a["pattern"]) for a in held[::3]} == set(UNSEEN_TONE_COMBOS)


def test_tone_captions_name_waveform_pitch_and_pattern():
    pitch_words = {"low": ("low",), "medium": ("medium", "middle"), "high": ("high",)}
    pattern_stems = {"steady": "steady", "pulsing": "puls", "rising": "rise", "falling": "fall"}
    captions = set()
    for index in range(500):
        sample = make_tone_sample(index, "train", seed=0)
        a, caption = sample.attrs, sample.caption
        assert a["waveform"] in caption.split() or f"{a['waveform']}," in caption.split(), caption
        assert any(re.search(rf"\b{w}", caption) for w in pitch_words[a["pitch"]]), caption
        assert pattern_stems[a["pattern"]] in caption.replace("rising", "rise"), caption
        # No caption names another waveform or pattern.
        assert sum(w in caption for w in TONE_WAVEFORMS) == 1, caption
        captions.add(caption)
    assert len(captions) > 200


def test_tone_prompts_and_dataset_items():
    prompts = tone_prompts()
    assert prompts["waveform"][0] == list(TONE_WAVEFORMS)
    assert prompts["pitch"][0] == list(TONE_PITCHES)
    assert prompts["pattern"][0] == list(TONE_PATTERNS)
    assert "a steady low {} tone" in prompts["waveform"][1]
    ds = TonesDataset("heldout", n=3, seed=0, sample_rate=22050, clip_seconds=0.5, tokenizer=lambda t: torch.ones(1, 7))
    item = ds[1]
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (11025,)
    assert item["text"].shape == (7,)
    json.dumps(item["meta"])
    assert item["meta"]["caption"] == make_tone_sample(1, "heldout", 0, 22050, 0.5).caption
    with pytest.raises(ValueError, match="sample_rate"):
        TonesDataset(sample_rate=8000)


def test_tone_generation_is_fast():
    start = time.perf_counter()
    for index in range(300):
        make_tone_sample(index, "train", seed=0)
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------------------------- writers


def test_write_shapes_csv(tmp_path):
    index_path = write_synthetic("shapes", tmp_path / "out", n=5, split="heldout", seed=3, progress=False)
    assert index_path == tmp_path / "out" / "index.csv"
    with open(index_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert {"image", "caption", "shape", "colour", "unseen"} <= set(rows[0])
    for i, row in enumerate(rows):
        sample = make_shape_sample(i, "heldout", 3)
        assert row["image"] == f"images/{i:06d}.png" and row["caption"] == sample.caption
        assert row["shape"] == sample.attrs["shape"] and row["unseen"] == str(sample.attrs["unseen"])
        with Image.open(index_path.parent / row["image"]) as image:
            np.testing.assert_array_equal(np.asarray(image), pixels(sample))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "shapes" and manifest["n"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_write_tones_wds(tmp_path):
    out = write_synthetic("tones", tmp_path / "wds", n=5, format="wds", shard_size=2, seed=1, progress=False)
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob(".*"))
    seen = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        for key in keys:
            sample = make_tone_sample(int(key), "train", 1)
            assert members[f"{key}.txt"].decode() == sample.caption
            assert json.loads(members[f"{key}.json"]) == sample.attrs
            audio, rate = soundfile.read(io.BytesIO(members[f"{key}.wav"]), dtype="float32")
            assert rate == 16000 and audio.shape == sample.audio.shape
            np.testing.assert_allclose(audio, sample.audio, atol=1.5 / 32768)
            seen.append(int(key))
    assert seen == list(range(5))


def test_written_folders_get_the_permissions_of_a_plain_mkdir(tmp_path):
    # The folder was a renamed tempfile.mkdtemp, readable by its owner only (0o700).
    mask = os.umask(0o022)
    try:
        out = write_synthetic("shapes", tmp_path / "shared", n=2, format="wds", progress=False)
        index = write_synthetic("shapes", tmp_path / "shared_csv", n=2, progress=False)
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert index.parent.stat().st_mode & 0o777 == 0o755 and (index.parent / "images").stat().st_mode & 0o777 == 0o755
    assert (out / "shard-000000.tar").stat().st_mode & 0o777 == index.stat().st_mode & 0o777 == 0o644
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_write_tones_csv_and_shapes_wds(tmp_path):
    index_path = write_synthetic("tones", tmp_path / "a", n=2, progress=False, clip_seconds=0.5)
    with open(index_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["audio"] == "audio/000001.wav" and rows[1]["waveform"] in TONE_WAVEFORMS
    info = soundfile.info(index_path.parent / rows[1]["audio"])
    assert info.samplerate == 16000 and info.frames == 8000 and info.subtype == "PCM_16"
    out = write_synthetic("shapes", tmp_path / "b", n=3, format="wds", progress=False)
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        image = Image.open(tar.extractfile("000002.png"))
        np.testing.assert_array_equal(np.asarray(image), pixels(make_shape_sample(2)))
    assert names[:3] == ["000000.png", "000000.txt", "000000.json"] and len(names) == 9


def test_writers_refuse_to_clobber(tmp_path):
    out = tmp_path / "data"
    out.mkdir()  # an existing empty directory is fine
    write_synthetic("shapes", out, n=2, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic("shapes", out, n=3, progress=False)
    # Replacing earlier output is allowed when asked for, and leaves no stale files.
    write_synthetic("shapes", out, n=1, format="wds", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", MANIFEST_NAME]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic("shapes", foreign, n=1, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="kind"):
        write_synthetic("sounds", tmp_path / "x", n=1)
    with pytest.raises(ValueError, match="format"):
        write_synthetic("shapes", tmp_path / "x", n=1, format="parquet")
    with pytest.raises(ValueError, match=r"unknown shapes option\(s\) \['colour_depth'\]; expected some of"):
        write_synthetic("shapes", tmp_path / "x", n=1, colour_depth=3)
    assert not (tmp_path / "x").exists()


def test_synth_command_takes_generator_options(tmp_path, capsys):
    from polymodal.cli import main

    out = tmp_path / "small"
    assert (
        main(
            [
                "data",
                "synth",
                "shapes",
                "--out",
                str(out),
                "--n",
                "2",
                "--split",
                "heldout",
                "--option",
                "image_size=32",
            ]
        )
        == 0
    )
    assert "wrote 2 heldout shapes samples" in capsys.readouterr().out
    image = Image.open(out / "images" / "000001.png")
    np.testing.assert_array_equal(np.asarray(image), pixels(make_shape_sample(1, "heldout", image_size=32)))
    assert json.loads((out / MANIFEST_NAME).read_text())["options"] == {"image_size": 32}
    for bad, message in (("image_size", "is not KEY=VALUE"), ("pixels=3", "unknown shapes option(s) ['pixels']")):
        assert main(["data", "synth", "shapes", "--out", str(tmp_path / "bad"), "--option", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_write_shapes_as_jpeg_for_the_csv_and_wds_loaders(tmp_path, capsys):
    """``image_format="jpg"``: real JPEGs (what most image-text data ships as) that the index and shard
    loaders decode to the generated pixels up to JPEG's loss, the same pixels from either layout."""
    from polymodal.datasets.pairs import ImageTextDataset
    from polymodal.datasets.wds import WebDatasetPairs
    from polymodal.encoders import CLIPTokenizer
    from tests.helpers import cli_run

    tokenizer = CLIPTokenizer(context_length=16)

    def raw(image):  # the decoded pixels themselves, no resizing or normalisation
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))

    n, seed = 6, 2
    index = write_synthetic("shapes", tmp_path / "csv", n=n, seed=seed, image_format="jpg", progress=False)
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f"images/{i:06d}.jpg" for i in range(n)]
    assert (index.parent / rows[0]["image"]).read_bytes()[:3] == b"\xff\xd8\xff"  # the JPEG start-of-image marker
    assert json.loads((tmp_path / "csv" / MANIFEST_NAME).read_text())["image_format"] == "jpg"
    from_index = ImageTextDataset(index, raw, tokenizer)
    out = write_synthetic("shapes", tmp_path / "wds", n=n, seed=seed, format="wds", image_format="jpg", progress=False)
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames()[:3] == ["000000.jpg", "000000.txt", "000000.json"]
    shards = WebDatasetPairs(str(out / "shard-000000.tar"), "image", raw, tokenizer=tokenizer, resampled=False)
    from_shards = {int(item["meta"]["key"]): item for item in shards}
    assert sorted(from_shards) == list(range(n))
    for i in range(n):
        sample = make_shape_sample(i, "train", seed)
        item = from_index[i]
        error = (item["image"] - torch.from_numpy(pixels(sample).astype(np.float32))).abs()
        assert 0 < error.mean() < 6, (i, error.mean())  # lossy, yet within a few of 255 levels
        assert torch.equal(item["text"], tokenizer(sample.caption).squeeze(0))
        assert torch.equal(from_shards[i]["image"], item["image"])  # the same JPEG bytes in both layouts
    with pytest.raises(ValueError, match=r"image_format must be one of \('png', 'jpg'\), got 'gif'"):
        write_synthetic("shapes", tmp_path / "x", n=1, image_format="gif", progress=False)
    with pytest.raises(ValueError, match="image_format applies to the shapes only"):
        write_synthetic("tones", tmp_path / "x", n=1, image_format="jpg", progress=False)
    assert not (tmp_path / "x").exists()
    code, stdout, _ = cli_run(
        ["data", "synth", "shapes", "--n", "2", "--image-format", "jpg", "--out", str(tmp_path / "cli")], capsys
    )
    assert code == 0 and sorted(p.name for p in (tmp_path / "cli" / "images").iterdir()) == ["000000.jpg", "000001.jpg"]
