"""Which folders a run writes into: empty ones, its own earlier run, or any with overwrite=true; and a run
killed during its first checkpoint save resumes (afresh) with resume=latest."""

import json

import pytest
import torch

from polymodal.errors import InputError
from polymodal.train import TrainConfig, Trainer
from polymodal.train import checkpoints as ckpt
from polymodal.train.rundir import MARKER
from tests.train.helpers import fit_until_killed


def trainer(make_config, **top) -> Trainer:
    return Trainer(TrainConfig.from_dict(make_config(**top)))


def metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_killed_during_its_first_save_starts_afresh_with_resume_latest(make_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = trainer(make_config, steps=3)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing training_state.pt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.undo()
    # what a SIGKILL leaves instead of the clean-up above: a half-written temporary folder, and an
    # unmarked checkpoint folder (e.g. copied by hand, or from a filesystem without atomic renames)
    stale = run / "checkpoints" / ".step_00000003.tmp-k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    (run / "checkpoints" / "step_00000003").mkdir()
    assert metric_steps(run) == [1, 2, 3] and ckpt.complete_checkpoints(run) == []

    resumed = trainer(make_config, steps=3, resume="latest")
    assert resumed.step == 0
    assert not (run / "checkpoints").exists()  # the leftovers are gone
    resumed.fit()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000003"]
    assert metric_steps(run) == [1, 2, 3, 3]  # the killed run's rows were replaced (the last row: evaluation)
    # the fresh start is the same run a clean start gives
    clean = trainer(make_config, steps=3, run_dir=str(tmp_path / "clean"))
    clean.fit()
    for key, value in clean.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_folder_with_a_users_own_files_is_refused_unless_overwrite(make_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: own recipe\n")
    (run / "curves.png").write_bytes(b"my plot")
    for resume in (None, "latest"):
        with pytest.raises(InputError) as error:
            trainer(make_config, resume=resume)
        message = str(error.value)
        assert (
            f"run_dir {str(run)!r} holds files that are not from a polymodal run (config.yaml, curves.png)" in message
        )
        assert "overwrite=true" in message and "\n" not in message
    assert (run / "config.yaml").read_text() == "my: own recipe\n" and (run / "curves.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "curves.png"]

    trainer(make_config, steps=1, overwrite=True).fit()
    assert (run / "config.yaml").read_text() != "my: own recipe\n" and (run / MARKER).is_file()


def test_an_empty_folder_and_the_runs_own_earlier_run(make_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    trainer(make_config, steps=2).fit()  # an existing empty folder is fine
    assert (run / MARKER).is_file()

    with pytest.raises(InputError, match=r"already holds a run \(metrics.jsonl, checkpoints, report.json\); pass "):
        trainer(make_config, steps=2)
    resumed = trainer(make_config, steps=4, resume="latest")  # its own run: continued, nothing deleted
    assert resumed.step == 2 and metric_steps(run) == [1, 2, 2]
    replaced = trainer(make_config, steps=2, overwrite=True)
    assert replaced.step == 0 and not (run / "metrics.jsonl").exists() and ckpt.complete_checkpoints(run) == []


def test_a_run_from_before_the_marker_is_recognised_by_its_checkpoints(make_config, tmp_path):
    run = tmp_path / "run"
    trainer(make_config, steps=2).fit()
    (run / MARKER).unlink()
    assert trainer(make_config, steps=3, resume="latest").step == 2


def test_a_file_as_run_dir_is_refused(make_config, tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(InputError, match="is a file; expected a folder"):
        trainer(make_config)


def test_a_resumed_run_keeps_its_earlier_metrics_and_drops_the_repeated_ones(make_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit_until_killed(trainer(make_config, steps=4, save_every=2), 3, monkeypatch)
    assert metric_steps(run) == [1, 2, 3]  # step 3 was logged, but the checkpoint is at step 2
    resumed = trainer(make_config, steps=4, resume="latest")
    assert resumed.step == 2 and metric_steps(run) == [1, 2]
    report = resumed.fit()
    assert metric_steps(run) == [1, 2, 3, 4, 4]
    # a finished run resumed again (what a second `make demo` does) reports the same run, not an empty one
    again = trainer(make_config, steps=4, resume="latest").fit()
    assert again["final_loss"] == report["final_loss"] and again["eval"] == report["eval"]
    assert metric_steps(run) == [1, 2, 3, 4, 4, 4]
