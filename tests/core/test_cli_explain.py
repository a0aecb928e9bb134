"""``polymodal explain`` as a user types it: one PNG overlay per input and a summary, written once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from polymodal import from_pretrained, get_preprocess, get_tokenizer
from polymodal.datasets import decode_image, write_synthetic
from polymodal.tasks import explain
from tests.helpers import cli_fails, cli_run, tiny_contrastive


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_data")
    write_synthetic("shapes", root / "shapes", n=3, split="heldout", seed=0, format="csv", progress=False)
    write_synthetic("tones", root / "tones", n=1, split="heldout", seed=0, format="csv", progress=False)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_models")
    vit = {"image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}}
    resnet = {"image": {"layers": [1, 1, 1, 1], "width": 8, "heads": 2, "image_size": 64, "output_dim": 16}}
    audio = {"audio": {"channels": [8, 8, 16, 16], "output_dim": 16}}
    for name, base, towers in (
        ("vit", "clip-vit-tiny", vit),
        ("resnet", "clip-rn50", resnet),
        ("audio", "clap-cnn-tiny", audio),
    ):
        tiny_contrastive(base, towers).save_pretrained(root / name)
    return root


def test_end_to_end_writes_an_overlay_per_image_and_the_summary(models, data, tmp_path):
    images = data / "shapes" / "images"
    command = [sys.executable, "-m", "polymodal", "explain", "--model", str(models / "vit"), str(images)]
    proc = subprocess.run(
        [*command, "--text", "a red circle", "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(images.glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*(f.name for f in files), "explanations.json"]
    )
    summary = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert summary["text"] == "a red circle" and [r["input"] for r in summary["results"]] == [str(f) for f in files]
    model = from_pretrained(models / "vit").eval()
    x = torch.stack([get_preprocess(model, "image")(decode_image(f)) for f in files])
    maps = explain(model, "image", x, "a red circle", get_tokenizer(model))  # gradcam by default
    for row, m in zip(summary["results"], maps):
        assert row["method"] == "gradcam" and row["shape"] == [32, 32]
        assert row["peak"] == list(divmod(int(m.flatten().argmax()), 32))
        with Image.open(row["output"]) as im:
            assert im.format == "PNG"
    assert proc.stdout.splitlines()[0].startswith(
        f"{files[0]} -> {tmp_path / 'out' / files[0].name} (gradcam, peak at row"
    )


def test_outputs_are_written_once_unless_overwrite(models, data, tmp_path, capsys):
    image = str(data / "shapes" / "images" / "000000.png")
    base = ["explain", "--model", str(models / "vit"), image, "--text", "a red circle", "--out", str(tmp_path)]
    assert cli_run([*base, "--method", "rollout"], capsys)[0] == 0
    before = (tmp_path / "000000.png").read_bytes()
    cli_fails(base, capsys, "000000.png exists; pass --overwrite to replace it")
    assert (tmp_path / "000000.png").read_bytes() == before
    code, out, _ = cli_run([*base, "--overwrite", "--json"], capsys)
    assert code == 0 and json.loads(out)["results"][0]["method"] == "gradcam"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png", "explanations.json"]  # no temporaries


def test_sounds_get_saliency_over_their_spectrogram(models, data, tmp_path, capsys):
    sound = str(data / "tones" / "audio" / "000000.wav")
    code, out, _ = cli_run(
        ["explain", "--model", str(models / "audio"), sound, "--text", "a beep", "--out", str(tmp_path)], capsys
    )
    assert code == 0 and "(saliency, peak at mel bin" in out
    summary = json.loads((tmp_path / "explanations.json").read_text())
    assert summary["results"][0]["shape"] == [64, 51]  # (n_mels, frames)
    assert (tmp_path / "000000.png").is_file()


def test_bad_requests_are_one_line_errors(models, data, tmp_path, capsys):
    image = str(data / "shapes" / "images" / "000000.png")
    sound = str(data / "tones" / "audio" / "000000.wav")
    out = ["--out", str(tmp_path / "out")]
    vit, resnet = ["--model", str(models / "vit")], ["--model", str(models / "resnet")]
    cli_fails(["explain", *vit, sound, "--text", "a beep", *out], capsys, "this model has no audio tower to explain")
    cli_fails(["explain", *vit, image, "--text", "", *out], capsys, "--text is empty")
    cli_fails(
        ["explain", *resnet, image, "--text", "a red circle", "--method", "rollout", *out],
        capsys,
        "rollout cannot explain this model's image tower, a ResNetEncoder; it takes gradcam or saliency",
    )
    cli_fails(["explain", *resnet, image, "--text", "a", "--shifts", "2", *out], capsys, "shifts refine a ViT")
    cli_fails(["explain", *vit, image, "--text", "a", "--upscale", "0.5", *out], capsys, "upscale must be a number")
    (tmp_path / "notes.txt").write_text("not an image")
    cli_fails(
        ["explain", *vit, str(tmp_path / "notes.txt"), "--text", "a", *out], capsys, "neither an image nor a sound"
    )
    assert not (tmp_path / "out").exists()  # nothing was written


def test_upscale_and_shifts_reach_the_maps(models, data, tmp_path, capsys):
    images = data / "shapes" / "images"
    args = ["explain", "--model", str(models / "vit"), str(images), "--text", "a blue square", "--json"]
    code, out, _ = cli_run(
        [*args, "--method", "grad_rollout", "--upscale", "1.5", "--shifts", "2", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 0
    summary = json.loads(out)
    model = from_pretrained(models / "vit").eval()
    files = sorted(images.glob("*.png"))
    x = torch.stack([get_preprocess(model, "image")(decode_image(f)) for f in files])
    maps = explain(model, "image", x, "a blue square", get_tokenizer(model), "grad_rollout", shifts=2, upscale=1.5)
    for row, m in zip(summary["results"], maps):
        assert row["shape"] == [32, 32] and row["peak"] == list(divmod(int(m.flatten().argmax()), 32))
