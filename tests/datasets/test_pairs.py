"""read_index and the index-file pair datasets (image-text, audio-text)."""

import csv
import io
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.datasets.pairs import AudioTextDataset, ImageTextDataset, read_index
from polymodal.datasets.samples import Batch, SkipBudget, SkipBudgetExceeded, SkippedSample, collate_samples
from polymodal.encoders import CLIPTokenizer, image_transform
from polymodal.errors import InputError

CONTEXT = 8


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(context_length=CONTEXT)


def _save(image: Image.Image, path, fmt: str = "PNG", **params):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **params)
    return path


# -------------------------------------------------------------------------------------- read_index


def test_read_csv_quoting_and_empty_cells(tmp_path):
    path = tmp_path / "index.csv"
    path.write_text('image,caption,label\na.png,"a cat, sitting",3\nb.png,,\n\nc.png,dog,1\n', encoding="utf-8")
    rows = read_index(path)
    assert rows == [
        {"image": "a.png", "caption": "a cat, sitting", "label": "3"},
        {"image": "b.png", "caption": None, "label": None},
        {"image": "c.png", "caption": "dog", "label": "1"},
    ]


def test_read_tsv_keeps_quotes_as_text(tmp_path):
    path = tmp_path / "index.tsv"
    path.write_text('image\tcaption\na.png\t"big" dog, with a comma\nb.png\t\n', encoding="utf-8")
    assert read_index(path) == [
        {"image": "a.png", "caption": '"big" dog, with a comma'},
        {"image": "b.png", "caption": None},
    ]
    other = tmp_path / "index.txt"
    other.write_text(path.read_text())
    assert read_index(other, format="tsv") == read_index(path)


def test_read_jsonl_keeps_types_and_skips_blank_lines(tmp_path):
    path = tmp_path / "index.jsonl"
    lines = [
        {"image": "a.png", "caption": "cat", "tags": ["x", "y"]},
        {"image": "b.png", "caption": None, "score": 0.5},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    assert read_index(path) == lines


def test_read_index_errors_name_what_is_wrong(tmp_path):
    unknown = tmp_path / "index.parquet"
    unknown.write_text("x")
    with pytest.raises(ValueError, match=r"'\.parquet'.*format="):
        read_index(unknown)
    with pytest.raises(ValueError, match="unknown index format 'xml'"):
        read_index(unknown, format="xml")
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_index(tmp_path / "nothing.csv")

    csv_path = tmp_path / "index.csv"
    csv_path.write_text("image,text,label\na.png,cat,1\n")
    with pytest.raises(InputError, match=r"no column 'caption'; its columns are \['image', 'text', 'label'\]"):
        read_index(csv_path, required_columns=("image", "caption"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="is empty"):
        read_index(empty)


def test_malformed_rows_are_skipped_samples_naming_the_line(tmp_path):
    # They used to refuse the whole file, although one bad row should cost one sample.
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png", caption: oops}\n["b.png"]\n')
    good, broken, listed = read_index(bad_json, required_columns=("image", "caption"))
    assert good == {"image": "a.png", "caption": "ok"}
    assert broken == SkippedSample(
        "malformed_row", f"{bad_json} line 3: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    assert listed == SkippedSample("malformed_row", f"{bad_json} line 4: expected a JSON object, got list")

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("image,caption\na.png,cat\nb.png,a dog, unquoted comma\nc.png\n\nd.png,\n")
    rows = read_index(ragged)
    assert rows[0] == {"image": "a.png", "caption": "cat"} and rows[3] == {"image": "d.png", "caption": None}
    assert rows[1].reason == rows[2].reason == "malformed_row"
    assert rows[1].detail == (
        f"{ragged} line 3: 3 fields but the header has 2 (['image', 'caption']); "
        "quote fields that contain the delimiter"
    )
    assert rows[2].detail.startswith(f"{ragged} line 4: 1 fields but the header has 2")
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("not json\n")
    with pytest.raises(InputError, match="no column 'image', 'caption'; its columns are \\[\\]"):
        read_index(only_bad, required_columns=("image", "caption"))


def test_bad_rows_and_bad_mentions_are_skipped_and_the_budget_stops_a_mostly_bad_file(tmp_path, tokenizer):
    _save(Image.new("RGB", (8, 8), (0, 255, 0)), tmp_path / "g.png")
    lines = [
        "image,caption,mentions",
        'g.png,a green square,"[""colour""]"',
        "g.png,short row",  # a cell missing
        "g.png,extra,cells,here",
        "g.png,,",  # empty caption
        "g.png,bad mentions,not json",
        'g.png,mentions of numbers,"[1, 2]"',
        "g.png,no mentions,",
    ]
    (tmp_path / "index.csv").write_text("\n".join(lines) + "\n")
    dataset = ImageTextDataset(tmp_path / "index.csv", image_transform(8, False), tokenizer)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 7
    assert items[0]["meta"]["mentions"] == '["colour"]' and items[6]["meta"]["mentions"] is None
    reasons = [item.reason if isinstance(item, SkippedSample) else None for item in items]
    assert reasons == [
        None,
        "malformed_row",
        "malformed_row",
        "missing_caption",
        "malformed_row",
        "malformed_row",
        None,
    ]
    assert (
        items[4].detail
        == f"{tmp_path / 'index.csv'} row 4: 'mentions' must be a list of attribute names (JSON), got 'not json'"
    )

    budget = SkipBudget(max_fraction=0.5, min_samples=4, log_interval=None, source="index.csv", knob="data.skip_budget")
    with pytest.raises(SkipBudgetExceeded) as info:
        budget.update(collate_samples(items))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, InputError)
    assert message.startswith(
        "index.csv: 71.4% of 7 samples were skipped, over the budget of 50% (raise data.skip_budget"
    )
    assert "malformed_row 4 (e.g. " in message and "line 3: 2 fields but the header has 3" in message


# ------------------------------------------------------------------------------- ImageTextDataset


def _image_fixture(tmp_path):
    """An index in tmp_path/data with good rows and one row for each kind of bad input."""
    data = tmp_path / "data"
    _save(Image.new("RGB", (20, 16), (200, 30, 30)), data / "img" / "red.png")
    _save(Image.new("RGB", (16, 20), (30, 30, 200)), data / "img" / "sub" / "blue.jpg", "JPEG")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0] + [0] * 765)
    _save(palette, data / "img" / "transparent.png", transparency=0)  # all transparent -> white
    (data / "img" / "zero.png").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    (data / "img" / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    lines = [
        "image,caption,label",
        "img/red.png,a red square,0",
        "img/sub/blue.jpg,  a blue square  ,1",
        "img/transparent.png,nothing at all,2",
        "img/missing.png,a ghost,3",
        "img/zero.png,zero bytes,4",
        "img/truncated.jpg,cut short,5",
        "img/red.png,   ,6",
        "img/red.png,,7",
        ",no image,8",
    ]
    (data / "index.csv").write_text("\n".join(lines) + "\n")
    return data / "index.csv"


def test_image_text_items_and_skips(tmp_path, tokenizer):
    index = _image_fixture(tmp_path)
    transform = image_transform(8, is_train=False, mean=0.0, std=1.0)
    dataset = ImageTextDataset(index, transform, tokenizer)
    assert len(dataset) == 9
    items = [dataset[i] for i in range(len(dataset))]

    red, blue, white = items[:3]
    assert red["image"].shape == (3, 8, 8) and red["image"].dtype == torch.float32
    assert red["text"].shape == (CONTEXT,) and red["text"].dtype == torch.long
    assert torch.equal(red["text"], tokenizer("a red square")[0])
    assert torch.allclose(red["image"][:, 4, 4], torch.tensor([200, 30, 30]) / 255, atol=1e-6)
    assert red["meta"] == {
        "label": "0",
        "caption": "a red square",
        "path": str(index.parent / "img" / "red.png"),
        "index": 0,
    }
    assert blue["meta"]["caption"] == "a blue square"
    assert torch.allclose(white["image"], torch.ones(3, 8, 8))
    json.dumps([item["meta"] for item in items[:3]])  # meta must be JSON-able

    reasons = [item.reason if isinstance(item, SkippedSample) else None for item in items[3:]]
    assert reasons == [
        "missing_file",
        "zero_bytes",
        "corrupt_image",
        "empty_caption",
        "missing_caption",
        "missing_file",
    ]
    assert "missing.png" in items[3].detail and "row 3" in items[3].detail


def test_image_text_root_and_jsonl_rows(tmp_path, tokenizer):
    images = tmp_path / "elsewhere"
    _save(Image.new("RGB", (8, 8), (0, 255, 0)), images / "g.png")
    index = tmp_path / "index.jsonl"
    rows = [
        {"file": "g.png", "text": "green", "attributes": {"colour": "green"}},
        {"file": "g.png"},  # no caption field at all
        {"file": "g.png", "text": None},
    ]
    index.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = ImageTextDataset(
        index, image_transform(8, False), tokenizer, image_key="file", caption_key="text", root=images
    )
    first = dataset[0]
    assert first["meta"]["attributes"] == {"colour": "green"} and first["meta"]["caption"] == "green"
    assert [dataset[1].reason, dataset[2].reason] == ["missing_caption", "missing_caption"]
    with pytest.raises(ValueError, match="no column 'caption'"):
        ImageTextDataset(index, image_transform(8, False), tokenizer, image_key="file")


def test_non_utf8_caption_in_csv_skips_only_that_row(tmp_path, tokenizer):
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "index.csv").write_bytes(b"image,caption\na.png,caf\xe9 in latin-1\na.png,fine\n")
    dataset = ImageTextDataset(tmp_path / "index.csv", image_transform(8, False), tokenizer)
    assert dataset[0].reason == "bad_encoding"
    assert dataset[1]["meta"]["caption"] == "fine"


def test_dataloader_with_workers_yields_batches(tmp_path, tokenizer):
    index = _image_fixture(tmp_path)
    dataset = ImageTextDataset(index, image_transform(8, is_train=False), tokenizer)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.num_seen for b in batches] == [4, 4, 1]
    assert sum(len(b) for b in batches) == 3
    assert batches[0].inputs["image"].shape == (3, 3, 8, 8)
    assert batches[0].inputs["text"].shape == (3, CONTEXT)
    skipped = {}
    for b in batches:
        for reason, count in b.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == {
        "missing_file": 2,
        "zero_bytes": 1,
        "corrupt_image": 1,
        "empty_caption": 1,
        "missing_caption": 1,
    }
    assert batches[2].inputs == {} and len(batches[2]) == 0  # the last row is a skip


# ------------------------------------------------------------------------------- AudioTextDataset


def test_audio_text_items_and_skips(tmp_path, tokenizer):
    rate = 44100
    t = np.arange(rate // 2) / rate
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    soundfile.write(tmp_path / "stereo.wav", np.stack([tone, tone], 1).astype(np.float32), rate, subtype="FLOAT")
    soundfile.write(tmp_path / "mono.flac", tone.astype(np.float32), rate, format="FLAC")
    soundfile.write(tmp_path / "silent.wav", np.zeros(1000, np.float32), 16000)
    index = tmp_path / "index.tsv"
    index.write_text(
        "audio\tcaption\tid\n"
        "stereo.wav\ta low hum\t7\n"
        "mono.flac\ta hum again\t8\n"
        "silent.wav\tnothing\t9\n"
        "absent.wav\tnothing\t10\n"
    )
    dataset = AudioTextDataset(index, tokenizer, sample_rate=16000, clip_seconds=1.0)
    first, second, silent, absent = (dataset[i] for i in range(4))
    assert first["audio"].shape == (16000,) and first["text"].shape == (CONTEXT,)
    assert first["meta"] == {"id": "7", "caption": "a low hum", "path": str(tmp_path / "stereo.wav"), "index": 0}
    assert 0.45 < first["audio"][1000:7000].abs().max() < 0.55
    assert second["audio"].shape == (16000,)
    assert (silent.reason, absent.reason) == ("silent_audio", "missing_file")
    batch = collate_samples([first, silent, second, absent])
    assert batch.inputs["audio"].shape == (2, 16000) and batch.skipped == {"silent_audio": 1, "missing_file": 1}
    with pytest.raises(ValueError, match="positive"):
        AudioTextDataset(index, tokenizer, sample_rate=16000, clip_seconds=0)


def test_hard_negatives_column_in_csv_and_jsonl(tmp_path, tokenizer):
    """A list of captions per row (JSON text in CSV, a list in JSON Lines), repeated up to the count asked;
    a cell that is not a non-empty list of captions skips its row, counted as bad_hard_negatives."""
    _save(Image.new("RGB", (8, 8), (200, 30, 30)), tmp_path / "a.png")
    rows = [
        ["a.png", "a red square", '["a blue square", "a red circle", "a red star"]'],
        ["a.png", "a red square", '["a blue square"]'],
        ["a.png", "a red square", "a blue square"],  # not JSON
        ["a.png", "a red square", "[]"],
        ["a.png", "a red square", '["a blue square", 3]'],
        ["a.png", "a red square", '{"a": "b"}'],
        ["a.png", "a red square", ""],
    ]
    index = tmp_path / "index.csv"
    with index.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "hard_negatives"])
        writer.writerows(rows)
    transform = image_transform(8, False)
    dataset = ImageTextDataset(index, transform, tokenizer, hard_negatives=2)
    first, second = dataset[0], dataset[1]
    assert first["text_negatives"].shape == (2, CONTEXT) and first["text_negatives"].dtype == torch.long
    assert torch.equal(first["text_negatives"], tokenizer(["a blue square", "a red circle"]))
    assert torch.equal(second["text_negatives"], tokenizer(["a blue square", "a blue square"]))
    bad = [dataset[i] for i in range(2, len(rows))]
    assert all(isinstance(b, SkippedSample) and b.reason == "bad_hard_negatives" for b in bad)
    assert "row 2" in bad[0].detail and "'hard_negatives'" in bad[0].detail
    batch = collate_samples([dataset[i] for i in range(len(rows))])
    assert batch.inputs["text_negatives"].shape == (2, 2, CONTEXT)
    assert batch.skipped == {"bad_hard_negatives": 5}
    # without hard_negatives the column is just metadata, and none is required
    assert "text_negatives" not in ImageTextDataset(index, transform, tokenizer)[2]
    with pytest.raises(InputError, match="no column 'negs'"):
        ImageTextDataset(index, transform, tokenizer, hard_negatives=1, hard_negatives_key="negs")
    with pytest.raises(ValueError, match="hard_negatives must be a non-negative integer"):
        ImageTextDataset(index, transform, tokenizer, hard_negatives=-1)

    jsonl = tmp_path / "index.jsonl"
    jsonl.write_text(
        json.dumps({"image": "a.png", "caption": "a red square", "hard_negatives": ["a red ring"]})
        + "\n"
        + json.dumps({"image": "a.png", "caption": "a red square", "hard_negatives": "a red ring"})
        + "\n"
    )
    rows = ImageTextDataset(jsonl, transform, tokenizer, hard_negatives=1)
    assert torch.equal(rows[0]["text_negatives"], tokenizer(["a red ring"]))
    assert rows[1].reason == "bad_hard_negatives"
