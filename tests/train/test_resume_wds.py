"""Resuming a run on WebDataset shards is exact, as it is on map-style data (test_trainer.py):
interrupted mid-epoch and resumed, it ends with the weights of an uninterrupted run."""

import pytest

from polymodal.datasets import write_synthetic
from tests.train.helpers import assert_same_weights, straight_and_resumed


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shards"
    write_synthetic("shapes", out, n=96, split="train", format="wds", shard_size=24, image_size=32, progress=False)
    return str(out / "shard-{000000..000003}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_shards_is_exact(make_config, tmp_path, monkeypatch, shards, workers):
    # 64 samples an epoch in batches of 16: the interruption after step 3 falls inside epoch 0, and
    # with 2 workers (2 batches each) on the second worker's turn. Augmentation draws random crops.
    data = {"source": "wds", "train": shards, "epoch_samples": 64, "num_workers": workers, "augment": True}

    def config(**top):
        cfg = make_config(data=data, **top)
        del cfg["data"]["train_size"], cfg["data"]["eval_size"]  # sizes of built-in data: refused for shards
        return cfg

    straight, resumed = straight_and_resumed(config(steps=6, run_dir=str(tmp_path / "run")), monkeypatch)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (3, 0, 3)
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)
    assert resumed.samples_seen == straight.samples_seen
    assert (resumed.epoch, resumed.batch_in_epoch) == (straight.epoch, straight.batch_in_epoch) == (1, 2)
