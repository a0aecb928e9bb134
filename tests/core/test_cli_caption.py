"""``polymodal caption`` as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from polymodal import (
    ModelConfig,
    build_model,
    create_model,
    from_pretrained,
    get_model_config,
    get_preprocess,
    get_tokenizer,
)
from polymodal.cli import main
from polymodal.datasets import decode_image, write_synthetic


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap") / "heldout"
    write_synthetic("shapes", root, n=5, split="heldout", seed=0, format="csv", progress=False)
    return root / "images"


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """A small random captioner over 40 token ids (its captions are gibberish, but deterministic)."""
    config = get_model_config("coca-vit-tiny").to_dict()
    del config["towers"]["text"]
    config["towers"]["image"]["args"].update(width=32, layers=1, heads=2, output_dim=None)
    config["decoder"]["args"].update(width=32, layers=1, heads=2, token_ids=[*range(38), 49406, 49407])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**config, "name": "cli-captioner"}))
    with torch.no_grad():
        model.decoder.pos_embed.normal_(std=1.0)  # captions that differ in length
    path = tmp_path_factory.mktemp("cap_model") / "model"
    model.save_pretrained(path)
    return path


def library_captions(model_dir, files, **options) -> list[str]:
    model = from_pretrained(model_dir).eval()
    transform = get_preprocess(model, "image")
    batch = torch.stack([transform(decode_image(f)) for f in files])
    return model.caption(batch, get_tokenizer(model), **options)


def test_end_to_end_json_equals_the_library(captioner, images):
    files = sorted(images.glob("*.png"))
    proc = subprocess.run(
        [sys.executable, "-m", "polymodal", "caption", "--model", str(captioner), str(images), "--beam", "3", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["decoding"] == "beam"
    assert [r["input"] for r in out["results"]] == [str(f) for f in files]
    assert [r["caption"] for r in out["results"]] == library_captions(captioner, files, num_beams=3)


def test_text_output_greedy_and_options(captioner, images, capsys):
    files = sorted(images.glob("*.png"))
    assert main(["caption", "--model", str(captioner), str(files[0]), str(files[1]), "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = library_captions(captioner, files[:2])
    assert lines == [f"{f}: {c}" for f, c in zip(files[:2], expected)]
    assert len(set(expected)) > 1 or expected[0] != "", "the fixture should give non-trivial captions"

    # --max-length cuts captions; sampling is reproducible with --seed
    assert main(["caption", "--model", str(captioner), str(images), "--max-length", "2", "--json"]) == 0
    short = [r["caption"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert short == library_captions(captioner, files, max_length=2)
    sample = ["caption", "--model", str(captioner), str(images), "--top-k", "5", "--temperature", "1.5", "--json"]
    assert main([*sample, "--seed", "3"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["decoding"] == "sample"
    assert main([*sample, "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    generator = torch.Generator().manual_seed(3)
    assert [r["caption"] for r in first["results"]] == library_captions(
        captioner, files, do_sample=True, top_k=5, temperature=1.5, generator=generator
    )


def _fails(argv, capsys, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err, captured.err


def test_bad_input_is_a_clear_error(captioner, images, tmp_path, capsys):
    model = ["--model", str(captioner)]
    _fails(["caption", *model, str(tmp_path / "missing.png")], capsys, "does not exist")
    (tmp_path / "notes.txt").write_text("not an image")
    _fails(["caption", *model, str(tmp_path / "notes.txt")], capsys, "is not a readable image")
    (tmp_path / "empty").mkdir()
    _fails(["caption", *model, str(tmp_path / "empty")], capsys, "holds no image files")
    _fails(["caption", *model, str(images), "--beam", "2", "--top-k", "3"], capsys, "--beam searches")
    _fails(["caption", *model, str(images), "--max-length", "40"], capsys, "beyond this decoder's limit of 31")
    _fails(["caption", *model, str(images), "--top-p", "1.5"], capsys, "--top-p is a probability")
    _fails(["caption", *model, str(images), "--beam", "0"], capsys, "--beam must be at least 1")
    _fails(["caption", "--model", "coca-vit-tiny", str(images)], capsys, "random weights")
    clip = tmp_path / "clip"
    create_model("clip-vit-tiny").save_pretrained(clip)
    _fails(["caption", "--model", str(clip), str(images)], capsys, "without a caption decoder")
    # nothing was written anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "empty", "notes.txt"]
    assert not list((tmp_path / "empty").iterdir())
