"""The trainer on tiny runs: loss falls, resume is exact, accumulation is exact, bad steps are skipped."""

import json

import pytest
import torch

from polymodal import from_pretrained
from polymodal.train import NonFiniteLossError, TrainConfig, Trainer, train
from polymodal.train import checkpoints as ckpt
from tests.train.helpers import assert_same_weights, straight_and_resumed


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_short_run_loss_falls_and_writes_outputs(make_config, tmp_path):
    cfg = make_config(
        steps=40,
        log_every=5,
        tensorboard=True,
        optim={"lr": 2e-3, "warmup_steps": 5},
        data={"train_size": 640, "batch_size": 32},
    )
    report = train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] * 0.8, losses
    assert report["steps"] == 40 and report["samples_seen"] == 40 * 32
    for name in ("report.json", "config.yaml", "curves.png", "retrieval_grid.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert "retrieval/text_to_image/R@5" in report["eval"] and "zeroshot/shape/top1" in report["eval"]
    # the final checkpoint is a normal saved model
    (last,) = ckpt.complete_checkpoints(run)
    model = from_pretrained(last)
    assert model.config.name == "clip-vit-tiny"


def test_resume_is_exact(make_config, tmp_path, monkeypatch):
    # the same run, interrupted after step 3 (its checkpoint written), then resumed from the latest checkpoint
    straight, resumed = straight_and_resumed(make_config(steps=6, run_dir=str(tmp_path / "run")), monkeypatch)
    assert resumed.step == 3
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)
    assert resumed.samples_seen == straight.samples_seen


def test_gradient_accumulation_equals_full_batch(make_config):
    full = Trainer(TrainConfig.from_dict(make_config()))
    accum = Trainer(TrainConfig.from_dict(make_config(optim={"accum_steps": 4})))
    accum.model.load_state_dict(full.model.state_dict())
    batch = next(full._batches())
    loss_full, norm_full, _ = full.train_step(batch)
    loss_acc, norm_acc, _ = accum.train_step(batch)
    torch.testing.assert_close(loss_acc, loss_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_acc, norm_full, rtol=1e-4, atol=1e-6)
    a, b = params(full.model), params(accum.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_non_finite_steps_are_skipped_then_stop(make_config, tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig.from_dict(make_config(steps=20, save_every=2)))
    real = trainer.task.loss
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 3 or calls["n"] > 4 else loss

    monkeypatch.setattr(trainer.task, "loss", flaky)
    with pytest.raises(NonFiniteLossError, match="5 consecutive steps"):
        trainer.fit()
    # step 3 was skipped once (parameters unchanged), then steps kept failing from the 5th call on
    assert trainer.nonfinite_total == 6 and trainer.step == 3
    (good,) = ckpt.complete_checkpoints(tmp_path / "run")[-1:]
    assert good.name == "step_00000002"
    from_pretrained(good)


def test_skipped_step_leaves_parameters_unchanged(make_config, monkeypatch):
    trainer = Trainer(TrainConfig.from_dict(make_config()))
    monkeypatch.setattr(trainer.task, "loss", lambda *a: torch.tensor(float("inf"), requires_grad=True))
    before = params(trainer.model)
    _, _, applied = trainer.train_step(next(trainer._batches()))
    assert not applied
    after = params(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_save_failure_keeps_previous(make_config, tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig.from_dict(make_config(steps=2)))
    trainer.fit()
    (previous,) = ckpt.complete_checkpoints(tmp_path / "run")
    trainer.step = 3

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert ckpt.complete_checkpoints(tmp_path / "run") == [previous]
    assert ckpt.resolve_resume(tmp_path / "run", "latest") == previous
    from_pretrained(previous)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
