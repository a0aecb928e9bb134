"""Resuming a run on WebDataset shards is exact, as it is on map-style data (test_trainer.py):
interrupted mid-epoch and resumed, it ends with the weights of an uninterrupted run."""

import pytest
import torch

from polymodal.datasets import write_synthetic
from polymodal.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shards"
    write_synthetic("shapes", out, n=96, split="train", format="wds", shard_size=24, image_size=32, progress=False)
    return str(out / "shard-{000000..000003}.tar")


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_shards_is_exact(make_config, tmp_path, monkeypatch, shards, workers):
    # 64 samples an epoch in batches of 16: the interruption after step 3 falls inside epoch 0, and
    # with 2 workers (2 batches each) on the second worker's turn. Augmentation draws random crops.
    data = {"source": "wds", "train": shards, "epoch_samples": 64, "num_workers": workers, "augment": True}

    def config(**top):
        cfg = make_config(data=data, **top)
        del cfg["data"]["train_size"], cfg["data"]["eval_size"]  # sizes of built-in data: refused for shards
        return cfg

    straight = Trainer(TrainConfig.from_dict(config(steps=6, run_dir=str(tmp_path / "a"))))
    straight.fit()

    interrupted = config(steps=6, save_every=3, run_dir=str(tmp_path / "b"))
    first = Trainer(TrainConfig.from_dict(interrupted))
    real_step = Trainer.train_step

    def step_then_crash(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(TrainConfig.from_dict({**interrupted, "resume": "latest"}))
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (3, 0, 3)
    resumed.fit()
    a, b = params(straight.model), params(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.samples_seen == straight.samples_seen
    assert (resumed.epoch, resumed.batch_in_epoch) == (straight.epoch, straight.batch_in_epoch) == (1, 2)
