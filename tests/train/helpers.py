"""Helpers shared by the trainer tests: compare weights, kill a run mid-way, resume it."""

import pytest
import torch

from polymodal.train import TrainConfig, Trainer


def weights(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict, to compare runs."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def fit_until_killed(trainer: Trainer, step: int, monkeypatch) -> Trainer:
    """Run ``trainer`` until it is interrupted (``KeyboardInterrupt``, as Ctrl-C) on reaching ``step``."""
    real_step = Trainer.train_step

    def crash(self, batch):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return trainer


def straight_and_resumed(config: dict, monkeypatch, kill_at: int = 3) -> tuple[Trainer, Trainer]:
    """``config`` run without a stop, and run again (with ``save_every=kill_at``) killed at step
    ``kill_at`` and resumed with ``resume=latest``; returns both trainers, the resumed one not yet fit."""
    root = config["run_dir"]
    straight = Trainer(TrainConfig.from_dict({**config, "run_dir": f"{root}-straight"}))
    straight.fit()
    interrupted = {**config, "run_dir": f"{root}-interrupted", "save_every": kill_at}
    fit_until_killed(Trainer(TrainConfig.from_dict(interrupted)), kill_at, monkeypatch)
    return straight, Trainer(TrainConfig.from_dict({**interrupted, "resume": "latest"}))
