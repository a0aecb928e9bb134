"""The trainer on tiny runs: loss falls, resume is exact, accumulation is exact, bad steps are skipped."""

import copy
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
    # with a model card that says where its weights came from
    card = (last / "README.md").read_text()
    assert f"trained with `polymodal train` into {run}, starting from random initialisation" in card


def test_resume_is_exact(make_config, tmp_path, monkeypatch):
    # the same run, interrupted after step 3 (its checkpoint written), then resumed from the latest checkpoint
    straight, resumed = straight_and_resumed(make_config(steps=6, run_dir=str(tmp_path / "run")), monkeypatch)
    assert resumed.step == 3
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)
    assert resumed.samples_seen == straight.samples_seen


def assert_same_step(full: Trainer, accum: Trainer, batch) -> None:
    """One optimiser step of each on ``batch`` gives the same loss, gradient norm and weights."""
    loss_full, norm_full, _ = full.train_step(batch)
    loss_acc, norm_acc, _ = accum.train_step(batch)
    torch.testing.assert_close(loss_acc, loss_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_acc, norm_full, rtol=1e-4, atol=1e-6)
    a, b = params(full.model), params(accum.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_accumulation_equals_full_batch(make_config):
    full = Trainer(TrainConfig.from_dict(make_config()))
    accum = Trainer(TrainConfig.from_dict(make_config(optim={"accum_steps": 4})))
    accum.model.load_state_dict(full.model.state_dict())
    batch = next(full._batches())
    assert_same_step(full, accum, batch)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiled_loss_steps_equal_the_dense_loss_with_and_without_accumulation(make_config, loss):
    """optim.loss_tile: a tiled loss (blocks of 5 on a batch of 16) gives the dense loss's steps, also with
    GradCache accumulation, whose loss over cached embeddings goes through the same tiled function."""
    results, start, batch = [], None, None
    for tile, accum in ((None, 1), (5, 1), (5, 4)):
        cfg = make_config(optim={"loss": loss, "loss_tile": tile, "accum_steps": accum})
        if loss == "siglip":
            cfg["model"]["overrides"]["init_logit_bias"] = -10.0
        trainer = Trainer(TrainConfig.from_dict(cfg))
        if start is None:
            start = copy.deepcopy(trainer.model.state_dict())
            batch = next(trainer._batches())
        trainer.model.load_state_dict(start)
        results.append((trainer, trainer.train_step(batch)[0]))
    (dense, want), *tiled = results
    for trainer, got in tiled:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        a, b = params(dense.model), params(trainer.model)
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


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_hard_negatives_and_groups_reach_the_loss_and_accumulate_exactly(make_config, loss):
    """data.hard_negatives and data.group_by: the trainer's loss is clip_loss / siglip_loss on the model's own
    embeddings of the captions and of their hard negatives, with positives wherever two shapes share a colour;
    GradCache (accum_steps 4) gives the full batch's step."""
    from polymodal.fusion import clip_loss, siglip_loss
    from polymodal.train.task_contrastive import stable_id

    data = {"hard_negatives": 2, "group_by": "colour", "builtin": {"two_shape_share": 0.0}}
    cfg = make_config(optim={"loss": loss, "loss_tile": 7}, data=data)
    if loss == "siglip":
        cfg["model"]["overrides"]["init_logit_bias"] = -10.0
    full = Trainer(TrainConfig.from_dict(cfg))
    accum = Trainer(TrainConfig.from_dict({**cfg, "optim": {**cfg["optim"], "accum_steps": 4}}))
    accum.model.load_state_dict(full.model.state_dict())
    batch = next(full._batches())
    assert batch.inputs["text_negatives"].shape[:2] == (16, 2)

    model = full.model
    images = model.encode_image(batch.inputs["image"], normalize=True)
    texts = model.encode_text(batch.inputs["text"], normalize=True)
    negatives = model.encode_text(batch.inputs["text_negatives"].flatten(0, 1), normalize=True)
    colours = [m["colour"] for m in batch.meta]
    groups = torch.tensor([stable_id(c) for c in colours])
    extras = {"groups": groups, "negatives": {"text": negatives}, "tile": None}
    scale = model.alignment.scale()
    if loss == "clip":
        want = clip_loss({"image": images, "text": texts}, scale, **extras).loss
    else:
        want = siglip_loss({"image": images, "text": texts}, scale, model.alignment.logit_bias, **extras).loss
    got = full.task.loss(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the negatives and groups change it: neither is silently dropped
    plain = clip_loss if loss == "clip" else lambda f, s, **k: siglip_loss(f, s, model.alignment.logit_bias, **k)
    with torch.no_grad():
        no_negatives = plain({"image": images, "text": texts}, scale, groups=groups).loss
        no_groups = plain({"image": images, "text": texts}, scale, negatives={"text": negatives}).loss
    assert abs(no_negatives.item() - got.item()) > 1e-3
    assert len(set(colours)) < len(colours)  # 16 samples, 8 colours: some share one, so the groups matter
    assert abs(no_groups.item() - got.item()) > 1e-4

    assert_same_step(full, accum, batch)


def test_shards_bring_their_hard_negatives_and_groups(make_config, tmp_path):
    """Training from WebDataset shards that ``data synth --hard-negatives`` wrote: each sample's wrong captions
    (the generated data's own) reach the loss as ``text_negatives``, and ``data.group_by`` finds the json fields
    (lists too, with the ids the generated data gives); the held-out stream is scored without negatives."""
    from polymodal.datasets import ShapesDataset, write_synthetic
    from polymodal.train.task_contrastive import stable_id

    for split in ("train", "heldout"):
        options = {"image_size": 32, "relation_share": 0.5}
        write_synthetic(
            "shapes",
            tmp_path / split,
            n=32,
            split=split,
            format="wds",
            shard_size=16,
            hard_negatives=2,
            progress=False,
            **options,
        )
    data = {
        "source": "wds",
        "train": str(tmp_path / "train" / "shard-{000000..000001}.tar"),
        "eval": str(tmp_path / "heldout" / "shard-{000000..000001}.tar"),
        "epoch_samples": 32,
        "hard_negatives": 2,
        "group_by": "mentions",
    }
    cfg = make_config(data=data, steps=2)
    del cfg["data"]["train_size"], cfg["data"]["eval_size"]
    trainer = Trainer(TrainConfig.from_dict(cfg))
    generated = ShapesDataset("train", n=32, hard_negatives=2, tokenizer=trainer.task.tokenizer, **options)
    batch = next(trainer._batches())
    assert batch.inputs["text_negatives"].shape[:2] == (16, 2)
    for meta, negatives in zip(batch.meta, batch.inputs["text_negatives"]):
        want = generated[int(meta["key"])]["meta"]
        assert meta["hard_negatives"] == want["hard_negatives"]
        assert torch.equal(negatives, trainer.task.tokenizer(want["hard_negatives"]))
    groups = trainer.task.group_ids(batch, torch.device("cpu"))
    want_ids = [stable_id(generated[int(m["key"])]["meta"]["mentions"]) for m in batch.meta]
    assert groups.tolist() == want_ids and len(set(want_ids)) < 16  # a list attribute, hashed alike
    assert all("text_negatives" not in item for item in trainer.data.eval if isinstance(item, dict))
    report = trainer.fit()
    assert report["eval"]["choice/swap/top1"] >= 0  # relation scenes of the shards are scored too


def test_bad_hard_negative_and_group_options_are_refused(make_config):
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match="data.hard_negatives must be >= 0"):
        TrainConfig.from_dict(make_config(data={"hard_negatives": -1}))
    with pytest.raises(ConfigError, match="data.hard_negatives needs data.source shapes"):
        TrainConfig.from_dict(make_config(data={"source": "tones", "hard_negatives": 1}))
    trainer = Trainer(TrainConfig.from_dict(make_config(data={"group_by": "label"})))
    batch = next(trainer._batches())
    with pytest.raises(ValueError, match=r"data.group_by='label': a sample has no 'label' \(its fields are \["):
        trainer.task.loss(trainer.model, batch)
