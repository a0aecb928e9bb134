"""The command line, run as a user types it."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import torch

from polymodal import create_model, from_pretrained
from tests.helpers import cli_fails, cli_run

# the console script installed beside this interpreter, as a user of the environment runs it
POLYMODAL = str(Path(sys.executable).parent / "polymodal")


def run(*args):
    proc = subprocess.run([POLYMODAL, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_help_and_version():
    # the installed console script and ``python -m``, as a user starts them; the other tests call the
    # same entry point in process
    assert run("--version").stdout.startswith("polymodal ")
    module = subprocess.run([sys.executable, "-m", "polymodal", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "list-models" in module.stdout


def _ok(capsys, *args) -> str:
    code, out, err = cli_run(list(args), capsys)
    assert code == 0, err
    return out


def test_list_models(capsys):
    out = _ok(capsys, "list-models")
    for name in ("clip-vit-b-32", "clip-rn50", "clip-vit-tiny", "clap-cnn-tiny", "bind-tiny"):
        assert name in out
    rows = json.loads(_ok(capsys, "list-models", "--json"))
    assert {"name": "bind-tiny", "modalities": ["audio", "image", "text"]}.items() <= next(
        r for r in rows if r["name"] == "bind-tiny"
    ).items()


def test_convert_round_trip(tmp_path, capsys):
    model = create_model("clip-vit-tiny")
    model.save_pretrained(tmp_path / "pm")
    _ok(capsys, "convert", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf")
    _ok(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "oc"), "--to", "open_clip")
    _ok(capsys, "convert", str(tmp_path / "oc"), str(tmp_path / "back"), "--to", "polymodal")
    again = from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    # a bare weights file needs its architecture
    pm_weights = str(tmp_path / "pm" / "model.safetensors")
    _ok(capsys, "convert", pm_weights, str(tmp_path / "oc.pt"), "--to", "open_clip", "--model", "clip-vit-tiny")
    assert (tmp_path / "oc.pt").is_file()


def test_convert_errors_are_clear(tmp_path, capsys):
    create_model("clip-vit-tiny").save_pretrained(tmp_path / "pm")
    cli_fails(["convert", str(tmp_path / "pm"), str(tmp_path / "pm"), "--to", "polymodal"], capsys, "already exists")
    weights = str(tmp_path / "pm" / "model.safetensors")
    cli_fails(["convert", weights, str(tmp_path / "x"), "--to", "hf"], capsys, "--model")
    missing = ["convert", str(tmp_path / "missing"), str(tmp_path / "y"), "--to", "hf", "--model", "clip-vit-tiny"]
    cli_fails(missing, capsys, "does not exist")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------- errors reach the user as one line


TINY_TRAIN = """run_dir: {run_dir}
steps: 2
progress: false
tensorboard: false
model:
  name: clip-vit-tiny
  overrides:
    image: {{image_size: 32, width: 32, layers: 1, heads: 2}}
    text: {{width: 32, layers: 1, heads: 2}}
data: {{train_size: 64, eval_size: 16, batch_size: 16}}
"""


def train_fails(*args, in_process: bool = True) -> str:
    """Run ``polymodal train ARGS``; it must fail with status 2 and print exactly one line (the error), no
    traceback. Returns that line. ``in_process=False`` starts ``python -m polymodal`` as a user does; in
    process, the same entry point (``polymodal.cli.main``) runs without an interpreter start each time."""
    if not in_process:
        proc = subprocess.run([sys.executable, "-m", "polymodal", "train", *args], capture_output=True, text=True)
        code, stderr = proc.returncode, proc.stderr
    else:
        from polymodal.cli import main

        buffer = io.StringIO()
        with contextlib.redirect_stderr(buffer):
            code = main(["train", *args])  # an uncaught exception (a traceback) fails the test here
        stderr = buffer.getvalue()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_train_config_errors_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\noptim:\n  lr: [0.1\n")
    line = train_fails(str(bad), in_process=False)  # once as a user types it
    assert f"'{bad}' is not valid YAML at line 4" in line and "<unicode string>" not in line
    bad.write_text("optim:\n  lr: fast\n")
    assert line_is(train_fails(str(bad)), f"error: '{bad}': optim.lr must be float, got 'fast'")
    bad.write_text("data:\n  batch_size: 0\n")
    assert line_is(train_fails(str(bad)), f"error: '{bad}': data.batch_size must be positive, got 0")
    bad.write_text("- a list\n")
    assert line_is(train_fails(str(bad)), f"error: '{bad}' must hold a YAML mapping, got list")
    good = tmp_path / "good.yaml"
    good.write_text("steps: 3\n")
    assert line_is(
        train_fails(str(good), "optim.betass=[0.9, 0.99]"),
        f"error: '{good}': unknown key(s) ['betass'] in optim; expected some of "
        "['accum_steps', 'betas', 'ema_decay', 'eps', 'grad_clip', 'local_loss', 'loss', 'loss_tile', 'lr', "
        "'max_nonfinite', 'min_lr_ratio', 'warmup_steps', 'weight_decay']",
    )


def line_is(line: str, expected: str) -> bool:
    assert line == expected
    return True


def test_train_refuses_a_foreign_training_state_in_one_line(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_TRAIN.format(run_dir=tmp_path / "run"))
    checkpoint = tmp_path / "step_00000001"
    model = create_model(
        "clip-vit-tiny",
        image={"image_size": 32, "width": 32, "layers": 1, "heads": 2},
        text={"width": 32, "layers": 1, "heads": 2},
    )
    model.save_pretrained(checkpoint)
    torch.save({"step": Path("not a training state")}, checkpoint / "training_state.pt")  # weights_only refuses it
    (checkpoint / "COMPLETE").write_text("1\n")
    line = train_fails(str(cfg), f"resume={checkpoint}")
    assert line == (
        f"error: '{checkpoint / 'training_state.pt'}' is not a polymodal training state written by a compatible "
        "version; resume from another checkpoint"
    )


def test_train_refuses_a_model_config_that_is_not_json(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_TRAIN.format(run_dir=tmp_path / "run"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    line = train_fails(str(cfg), f"model.name={broken}")
    assert "config.json" in line


def test_multi_line_messages_are_printed_on_one_line(monkeypatch, capsys):
    from polymodal import cli
    from polymodal.errors import InputError

    def fails(args):
        raise InputError("data.csv, row 3:\n  expected a caption\n\n  got nothing")

    monkeypatch.setattr(cli, "_train", fails)
    assert cli.main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: data.csv, row 3: expected a caption got nothing\n"
