"""Hard negatives and groups from files: the ``hard_negatives`` field of WebDataset samples, and the files
``write_synthetic`` / ``polymodal data synth --hard-negatives`` write, which hold the very wrong captions of
the generated data."""

import csv
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from polymodal.datasets import ShapesDataset, write_synthetic
from polymodal.datasets.samples import SkippedSample, collate_samples
from polymodal.datasets.wds import WebDatasetPairs, write_wds_shards
from polymodal.encoders import CLIPTokenizer, image_transform
from tests.helpers import cli_fails, cli_run

CONTEXT = 8


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(context_length=CONTEXT)


def _pairs(urls, tokenizer, **options) -> WebDatasetPairs:
    """The shards' samples in order (no resampling, no shuffle)."""
    transform = image_transform(8, is_train=False)
    return WebDatasetPairs(urls, "image", transform, tokenizer=tokenizer, resampled=False, shuffle_buffer=0, **options)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_shard_hard_negatives_and_bad_fields_are_skipped_and_counted(tmp_path, tokenizer):
    fields = [
        {"hard_negatives": ["a blue square", "a red circle", "a red star"], "label": 1},  # first 2 of 3
        {"hard_negatives": ["a blue square"]},  # repeated up to 2
        {"hard_negatives": "a blue square"},  # text, not a list
        {"hard_negatives": []},
        {"hard_negatives": ["a blue square", 3]},
        {"hard_negatives": {"a": "b"}},
        {"label": 2},  # no such field
    ]
    samples = [
        {"__key__": f"s{i}", "png": _png(), "txt": "a red square", "json": json.dumps(f).encode()}
        for i, f in enumerate(fields)
    ]
    urls = [str(p) for p in write_wds_shards(samples, tmp_path / "shards", max_count=4)]
    items = list(_pairs(urls, tokenizer, hard_negatives=2))
    first, second, *bad = items
    assert first["text_negatives"].shape == (2, CONTEXT) and first["text_negatives"].dtype == torch.long
    assert torch.equal(first["text_negatives"], tokenizer(["a blue square", "a red circle"]))
    assert torch.equal(second["text_negatives"], tokenizer(["a blue square", "a blue square"]))
    assert first["meta"]["label"] == 1  # the json's other fields reach the meta, for data.group_by
    assert all(isinstance(b, SkippedSample) and b.reason == "bad_hard_negatives" for b in bad)
    assert "s2" in bad[0].detail and "json field 'hard_negatives'" in bad[0].detail
    assert "is empty or missing" in bad[-1].detail
    batch = collate_samples(items)
    assert batch.inputs["text_negatives"].shape == (2, 2, CONTEXT)
    assert batch.skipped == {"bad_hard_negatives": 5}
    # without hard_negatives the field is only metadata, and none is required
    plain = list(_pairs(urls, tokenizer))
    assert all(isinstance(i, dict) and "text_negatives" not in i for i in plain)
    # another field name
    other = [{**s, "json": json.dumps({"negs": ["a blue square"]}).encode()} for s in samples[:1]]
    other_urls = [str(p) for p in write_wds_shards(other, tmp_path / "other")]
    (item,) = _pairs(other_urls, tokenizer, hard_negatives=1, hard_negatives_key="negs")
    assert torch.equal(item["text_negatives"], tokenizer(["a blue square"]))
    with pytest.raises(ValueError, match="hard_negatives must be a non-negative integer, got -1"):
        _pairs(urls, tokenizer, hard_negatives=-1)


def test_written_files_hold_the_generated_hard_negatives(tmp_path, tokenizer):
    """The csv column and the shards' json field equal ShapesDataset(hard_negatives=...)'s wrong captions, for
    one-shape, two-shape and relation scenes alike."""
    options = {"image_size": 32, "relation_share": 0.5}
    generated = ShapesDataset("train", n=12, seed=3, tokenizer=tokenizer, hard_negatives=3, **options)
    want = [generated[i]["meta"]["hard_negatives"] for i in range(12)]
    assert any(generated[i]["meta"].get("relation") for i in range(12))  # relation scenes are among them

    index = write_synthetic("shapes", tmp_path / "csv", n=12, seed=3, hard_negatives=3, progress=False, **options)
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["hard_negatives"]) for r in rows] == want
    assert json.loads((tmp_path / "csv" / "synthetic.json").read_text())["hard_negatives"] == 3

    out = write_synthetic(
        "shapes", tmp_path / "wds", n=12, seed=3, format="wds", hard_negatives=3, progress=False, **options
    )
    with tarfile.open(out / "shard-000000.tar") as tar:
        fields = [json.load(tar.extractfile(f"{i:06d}.json")) for i in range(12)]
    assert [f["hard_negatives"] for f in fields] == want
    # and asking for them changes no image or caption
    plain = write_synthetic("shapes", tmp_path / "plain", n=12, seed=3, progress=False, **options)
    with open(plain, newline="") as f:
        assert [r["caption"] for r in csv.DictReader(f)] == [r["caption"] for r in rows]
    assert (tmp_path / "plain" / "images" / "000007.png").read_bytes() == (
        tmp_path / "csv" / "images" / "000007.png"
    ).read_bytes()
    with pytest.raises(ValueError, match="hard_negatives are made for the shapes only"):
        write_synthetic("tones", tmp_path / "tones", n=1, hard_negatives=1, progress=False)


def test_synth_command_writes_hard_negatives_and_refuses_bad_counts(tmp_path, capsys):
    out = tmp_path / "negs"
    args = ["data", "synth", "shapes", "--n", "3", "--hard-negatives", "2", "--option", "image_size=32"]
    code, stdout, _ = cli_run([*args, "--out", str(out)], capsys)
    assert code == 0 and "wrote 3 train shapes samples" in stdout
    with open(out / "index.csv", newline="") as f:
        assert all(len(json.loads(r["hard_negatives"])) == 2 for r in csv.DictReader(f))
    base = ["data", "synth", "shapes", "--n", "1"]
    cli_fails(
        [*base, "--out", str(tmp_path / "a"), "--hard-negatives", "two"],
        capsys,
        "--hard-negatives must be a non-negative integer",
    )
    cli_fails(
        [*base, "--out", str(tmp_path / "b"), "--hard-negatives", "-1"],
        capsys,
        "--hard-negatives must be a non-negative integer",
    )
    cli_fails([*base, "--out", str(tmp_path / "c"), "--option", "hard_negatives=2"], capsys, "use --hard-negatives N")
    cli_fails(
        ["data", "synth", "tones", "--n", "1", "--out", str(tmp_path / "d"), "--hard-negatives", "1"],
        capsys,
        "shapes only",
    )
    assert not any((tmp_path / name).exists() for name in "abcd")
