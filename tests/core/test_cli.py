"""The command line, run as a user types it."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from polymodal import create_model, from_pretrained

# the console script installed beside this interpreter, as a user of the environment runs it
POLYMODAL = str(Path(sys.executable).parent / "polymodal")


def run(*args, check=True):
    proc = subprocess.run([POLYMODAL, *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_and_version():
    assert "list-models" in run("--help").stdout
    assert run("--version").stdout.startswith("polymodal ")
    assert (
        "usage" in subprocess.run([sys.executable, "-m", "polymodal", "--help"], capture_output=True, text=True).stdout
    )


def test_list_models():
    out = run("list-models").stdout
    for name in ("clip-vit-b-32", "clip-rn50", "clip-vit-tiny", "clap-cnn-tiny", "bind-tiny"):
        assert name in out
    rows = json.loads(run("list-models", "--json").stdout)
    assert {"name": "bind-tiny", "modalities": ["audio", "image", "text"]}.items() <= next(
        r for r in rows if r["name"] == "bind-tiny"
    ).items()


def test_convert_round_trip(tmp_path):
    model = create_model("clip-vit-tiny")
    model.save_pretrained(tmp_path / "pm")
    run("convert", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf")
    run("convert", str(tmp_path / "hf"), str(tmp_path / "oc"), "--to", "open_clip")
    run("convert", str(tmp_path / "oc"), str(tmp_path / "back"), "--to", "polymodal")
    again = from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    # a bare weights file needs its architecture
    run(
        "convert",
        str(tmp_path / "pm" / "model.safetensors"),
        str(tmp_path / "oc.pt"),
        "--to",
        "open_clip",
        "--model",
        "clip-vit-tiny",
    )
    assert (tmp_path / "oc.pt").is_file()


def test_convert_errors_are_clear(tmp_path):
    create_model("clip-vit-tiny").save_pretrained(tmp_path / "pm")
    proc = run("convert", str(tmp_path / "pm"), str(tmp_path / "pm"), "--to", "polymodal", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run("convert", str(tmp_path / "pm" / "model.safetensors"), str(tmp_path / "x"), "--to", "hf", check=False)
    assert proc.returncode != 0 and "--model" in proc.stderr
    proc = run(
        "convert",
        str(tmp_path / "missing"),
        str(tmp_path / "y"),
        "--to",
        "hf",
        "--model",
        "clip-vit-tiny",
        check=False,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
