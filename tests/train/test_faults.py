"""Trainer faults: the fp16 scaler's overflow steps, recomputed forwards and their RNG, logging without a
progress bar, unusable training-state files, an exceeded skip budget, and evaluation during training."""

import dataclasses
import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from polymodal.errors import InputError
from polymodal.train import NonFiniteLossError, TrainConfig, Trainer
from polymodal.train import checkpoints as ckpt
from polymodal.train.tasks import ForwardRngState


def trainer(make_config, **top) -> Trainer:
    return Trainer(TrainConfig.from_dict(make_config(**top)))


def with_cpu_scaler(t: Trainer, init_scale: float) -> Trainer:
    """``precision: fp16`` needs CUDA; the scaler logic is the same with torch's CPU gradient scaler."""
    t.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return t


def overflow_first(t: Trainer, calls: int) -> dict:
    """Make the first ``calls`` backward passes produce infinite gradients while the loss stays finite, as
    a too-large loss scale does in fp16."""
    left = {"n": calls}

    def hook(grad):
        if left["n"] > 0:
            left["n"] -= 1
            return torch.full_like(grad, float("inf"))
        return grad

    next(p for p in t.model.parameters() if p.requires_grad).register_hook(hook)
    return left


# ---------------------------------------------------------------------- B10: fp16 scaler overflow


def test_scaler_overflow_steps_are_not_non_finite_steps(make_config):
    t = with_cpu_scaler(trainer(make_config, steps=3, optim={"max_nonfinite": 2}), init_scale=2.0**16)
    left = overflow_first(t, 4)  # more overflow steps in a row than max_nonfinite allows non-finite ones
    t.fit()
    assert left["n"] == 0 and t.step == 3
    assert t.nonfinite_total == 0 and t.nonfinite_in_row == 0
    assert t.scaler.get_scale() == 2.0**12  # halved once per overflow: the scaler found its scale


def test_a_nan_loss_still_counts_with_a_scaler(make_config, monkeypatch):
    t = with_cpu_scaler(trainer(make_config, steps=3, optim={"max_nonfinite": 2}), init_scale=2.0**16)
    real = t.task.loss
    monkeypatch.setattr(t.task, "loss", lambda model, batch: real(model, batch) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        t.fit()
    assert t.nonfinite_total == 2 and t.step == 0


def test_infinite_gradients_at_a_scale_of_one_are_genuine(make_config):
    t = with_cpu_scaler(trainer(make_config, steps=3, optim={"max_nonfinite": 2}), init_scale=1.0)
    overflow_first(t, 100)
    with pytest.raises(NonFiniteLossError):
        t.fit()
    assert t.nonfinite_total == 2


# ---------------------------------------------------------------------- B4: recomputed forwards


def dropout_net(device="cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 8)).to(device).train()


def test_a_recomputed_forward_draws_the_same_dropout_on_cpu():
    net, x = dropout_net(), torch.randn(32, 16)
    state = ForwardRngState("cpu")
    cached = net(x)
    state.restore()
    assert torch.equal(net(x), cached)
    assert not torch.equal(net(x), cached)  # without restoring, dropout differs


def test_the_accelerator_generator_is_captured_and_restored(monkeypatch):
    """On CUDA dropout draws from the device's generator, which ``torch.get_rng_state`` does not cover."""
    calls = []

    class FakeAccelerator:
        @staticmethod
        def get_rng_state(device):
            calls.append(("get", device))
            return torch.tensor([7, 8], dtype=torch.uint8)

        @staticmethod
        def set_rng_state(state, device):
            calls.append(("set", device, state.tolist()))

    monkeypatch.setattr(torch, "get_device_module", lambda kind: FakeAccelerator if kind == "cuda" else None)
    cpu_before = torch.get_rng_state()
    state = ForwardRngState(torch.device("cuda", 1))
    torch.rand(3)
    state.restore()
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1), [7, 8])]
    assert torch.equal(torch.get_rng_state(), cpu_before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_recomputed_forward_draws_the_same_dropout_on_cuda():
    net, x = dropout_net("cuda"), torch.randn(32, 16, device="cuda")
    state = ForwardRngState(x.device)
    cached = net(x)
    torch.rand(100, device="cuda")  # other work between the two passes moves the device generator
    state.restore()
    assert torch.equal(net(x), cached)


# ---------------------------------------------------------------------- B8: logging without a progress bar


def test_without_a_progress_bar_a_line_is_logged_every_log_every_steps(make_config, caplog, tmp_path):
    t = trainer(make_config, steps=4, log_every=2, progress=False)
    with caplog.at_level(logging.INFO, logger="polymodal.train"):
        t.fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert lines == [
        f"step {r['step']}/4: loss {r['loss']:.4f}, lr {r['lr']:.3g}, {r['samples_per_s']:.0f} samples/s" for r in rows
    ]


# ---------------------------------------------------------------------- bad input becomes one clear error


class NotPolymodal:
    pass


@pytest.mark.parametrize("content", ["foreign object", "garbage"])
def test_an_unusable_training_state_names_the_file(make_config, tmp_path, content):
    trainer(make_config, steps=1).fit()
    (last,) = ckpt.complete_checkpoints(tmp_path / "run")
    state_file = last / ckpt.STATE_NAME
    if content == "garbage":
        state_file.write_bytes(b"not a torch file")
    else:
        torch.save({"step": NotPolymodal()}, state_file)  # weights_only=True refuses to unpickle it
    with pytest.raises(InputError) as error:
        trainer(make_config, steps=2, resume="latest")
    message = str(error.value)
    assert message == (
        f"{str(state_file)!r} is not a polymodal training state written by a compatible version; resume from "
        "another checkpoint"
    )


def test_an_exceeded_skip_budget_is_an_input_error_naming_the_data(make_config, monkeypatch):
    t = trainer(make_config, steps=20, data={"skip_budget": 0.25})
    real = t._batches

    def with_bad_samples():
        for batch in real():
            yield dataclasses.replace(batch, skipped={"unreadable image": 16}, num_seen=len(batch) + 16)

    monkeypatch.setattr(t, "_batches", with_bad_samples)
    with pytest.raises(InputError) as error:
        t.fit()
    message = str(error.value)
    # the budget is judged after its first 200 samples: the 7th batch of 16 good and 16 bad ones
    assert message == (
        "the built-in shapes data: 50.0% of 224 samples were skipped, over the budget of 25% (raise "
        "data.skip_budget to allow more): unreadable image 112"
    )


# ---------------------------------------------------------------------- B13: evaluation during training


def test_evaluating_during_training_leaves_the_trajectory_unchanged(make_config, tmp_path, monkeypatch):
    # patch dropout draws from torch's generator at every training step
    dropout = {"model": {"overrides": {"image": {"patch_dropout": 0.5}}}}
    plain = trainer(make_config, steps=4, run_dir=str(tmp_path / "plain"), **dropout)
    plain_report = plain.fit()
    evaluating = trainer(make_config, steps=4, eval_every=1, eval_subset=16, run_dir=str(tmp_path / "eval"), **dropout)
    real_evaluate = evaluating.task.evaluate

    def evaluate_drawing_random_numbers(*args):
        # as an evaluation may (a shuffling DataLoader takes its seed from torch, random crops, sampled captions)
        torch.rand(5), random.random(), np.random.rand()
        return real_evaluate(*args)

    monkeypatch.setattr(evaluating.task, "evaluate", evaluate_drawing_random_numbers)
    report = evaluating.fit()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, evaluating.model.state_dict()[key]), key
    rows = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    eval_rows = [r for r in rows if "retrieval/text_to_image/R@1" in r]
    assert [r["step"] for r in eval_rows] == [1, 2, 3, 4]
    assert report["eval"] == plain_report["eval"]  # the final evaluation uses the whole held-out split
    assert eval_rows[-1] == {"step": 4, **plain_report["eval"]}


def test_first_samples_takes_a_subset_of_the_held_out_split(make_config):
    from polymodal.train.loop import first_samples

    t = trainer(make_config)
    assert len(first_samples(t.data, 16).eval) == 16 and first_samples(t.data, 16).eval[3] is not None
    assert first_samples(t.data, 0) is t.data and first_samples(t.data, 10**6) is t.data
