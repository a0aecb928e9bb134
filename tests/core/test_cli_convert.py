"""``polymodal convert`` on resized architectures: --override, --model DIR, and the positional-table hint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polymodal import create_model, export_model, from_pretrained, get_model_config
from polymodal.commands.convert import parse_overrides
from polymodal.convert import resize_hints
from polymodal.errors import InputError
from tests.core.test_open_clip_parity import perturbed

POLYMODAL = str(Path(sys.executable).parent / "polymodal")


def run(*args):
    return subprocess.run([POLYMODAL, "convert", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """A clip-vit-tiny trained at image_size 64 (the registered one takes 48), saved as open_clip weights."""
    tmp = tmp_path_factory.mktemp("resized")
    torch.manual_seed(0)
    model = perturbed(create_model("clip-vit-tiny", image={"image_size": 64}))
    export_model(model, tmp / "oc.safetensors", to="open_clip")
    return model, tmp / "oc.safetensors"


def test_resized_checkpoint_without_override_names_the_fitting_image_size(resized, tmp_path):
    _, weights = resized
    proc = run(weights, tmp_path / "out", "--to", "polymodal", "--model", "clip-vit-tiny")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "65 tokens (8x8 grid = image_size 64 at patch 8)" in lines[0]
    assert "the model's has 37 (6x6 grid, image_size 48)" in lines[0]
    assert lines[0].endswith("pass --override image.image_size=64")
    assert not (tmp_path / "out").exists()


def test_resized_checkpoint_converts_with_the_override(resized, tmp_path):
    model, weights = resized
    proc = run(
        weights, tmp_path / "out", "--to", "polymodal", "--model", "clip-vit-tiny", "--override", "image.image_size=64"
    )
    assert proc.returncode == 0, proc.stderr
    again = from_pretrained(tmp_path / "out").eval()
    assert again.config.towers["image"].args["image_size"] == 64
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images), rtol=0, atol=0)


def test_model_may_be_a_saved_model_directory(resized, tmp_path):
    model, weights = resized
    model.save_pretrained(tmp_path / "arch")
    proc = run(weights, tmp_path / "out", "--to", "polymodal", "--model", tmp_path / "arch")
    assert proc.returncode == 0, proc.stderr
    again = from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_override_errors_are_one_line(resized, tmp_path):
    _, weights = resized
    proc = run(weights, tmp_path / "out", "--to", "polymodal", "--model", "clip-vit-tiny", "--override", "audio.x=1")
    assert proc.returncode == 2 and "no 'audio' tower" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_parse_overrides():
    assert parse_overrides(["image.image_size=96", "embed_dim=256", "image.ls_init_value=null"]) == {
        "image": {"image_size": 96, "ls_init_value": None},
        "embed_dim": 256,
    }
    for bad in ("image_size", "a.b.c=1", "=3", "image.=3"):
        with pytest.raises(InputError, match="KEY=VALUE"):
            parse_overrides([bad])


def test_resize_hints_cover_text_and_resnet_tables():
    model = create_model("clip-vit-tiny")
    state = dict(model.state_dict())
    assert resize_hints(state, model.config) == []
    state["towers.text.pos_embed"] = torch.zeros(77, 128)
    [(reason, fix)] = resize_hints(state, model.config)
    assert "77 positions but the model's has 32" in reason and fix == "text.context_length=77"

    config = get_model_config("clip-rn50")  # 224 at stride 32: 7x7 + 1
    state = {"towers.image.attnpool.pos_embed": torch.zeros(10 * 10 + 1, 8)}
    [(reason, fix)] = resize_hints(state, config)
    assert "10x10 grid = image_size 320 at stride 32" in reason and fix == "image.image_size=320"
