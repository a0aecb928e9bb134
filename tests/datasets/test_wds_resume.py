"""A WebDataset stream resumed mid-epoch gives exactly the batches an uninterrupted epoch gives next,
for every rank and DataLoader worker layout, augmentation included."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.datasets.samples import collate_samples
from polymodal.datasets.wds import WebDatasetPairs, resume_point, write_wds_shards
from polymodal.encoders import image_transform


def _png(seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    samples = [{"__key__": f"s{i:03d}", "png": _png(i), "txt": f"sample {i}"} for i in range(30)]
    return write_wds_shards(samples, tmp_path_factory.mktemp("shards"), max_count=6)


def _stream(shards, rank: int, resampled: bool = True, epoch_samples: int | None = 41) -> WebDatasetPairs:
    return WebDatasetPairs(
        [str(p) for p in shards],
        transform=image_transform(8, is_train=True, mean=0.0, std=1.0),  # random crops: draws torch's RNG
        tokenizer=lambda caption: torch.tensor([[len(caption)]]),
        resampled=resampled,
        epoch_samples=epoch_samples,
        shuffle_buffer=8,
        seed=5,
        rank=rank,
        world_size=2,
    )


def _batches(dataset, workers: int, batch_size: int, epoch: int, start_batch: int = 0):
    dataset.set_epoch(epoch, start_batch=start_batch, batch_size=batch_size)
    # A different loader seed on purpose: worker seeds must not matter, only the items' places.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        drop_last=True,
        generator=torch.Generator().manual_seed(100 + start_batch),
    )
    return [([m["key"] for m in batch.meta], batch.inputs["image"]) for batch in loader]


def _assert_same(resumed, expected):
    assert [keys for keys, _ in resumed] == [keys for keys, _ in expected]
    for (_, got), (_, want) in zip(resumed, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_epoch_continues_with_the_uninterrupted_batches(shards, workers, rank):
    dataset = _stream(shards, rank)
    # 41 items per rank: workers get 21 and 20, i.e. 3 and 2 batches of 7; one process gets 5.
    full = _batches(dataset, workers, 7, epoch=3)
    assert len(full) == 5
    assert len({key for keys, _ in full for key in keys}) > 7  # batches differ from each other
    for start in (1, 3, 4, 5):
        _assert_same(_batches(dataset, workers, 7, epoch=3, start_batch=start), full[start:])
    _assert_same(_batches(dataset, workers, 7, epoch=3), full)  # start_batch holds for one iteration only
    other_rank = _batches(_stream(shards, 1 - rank), workers, 7, epoch=3)
    assert [keys for keys, _ in other_rank] != [keys for keys, _ in full]


def test_resume_of_shards_read_once_without_epoch_samples(shards):
    dataset = _stream(shards, rank=0, resampled=False, epoch_samples=None)
    full = _batches(dataset, 0, 4, epoch=1)
    assert len(full) == 4  # this rank's 3 shards of 6 samples: 4 whole batches of 4
    for start in (1, 3):
        _assert_same(_batches(dataset, 0, 4, epoch=1, start_batch=start), full[start:])


def test_resume_point_follows_the_dataloaders_turns():
    assert resume_point(0, [3, 2]) == ([0, 0], 0)
    assert resume_point(1, [3, 2]) == ([1, 0], 1)
    assert resume_point(3, [3, 2]) == ([2, 1], 1)
    assert resume_point(4, [3, 2]) == ([2, 2], 0)
    assert resume_point(5, [3, 2]) == ([3, 2], 0)  # the epoch is over
    assert resume_point(7, [1, None, 4]) == ([1, 3, 3], 1)
    assert resume_point(5, [2, 1, 2]) == ([2, 1, 2], 0)
    assert resume_point(4, [2, 1, 2]) == ([2, 1, 1], 2)
    assert resume_point(10**9 + 1, [None, None]) == ([5 * 10**8 + 1, 5 * 10**8], 1)
    with pytest.raises(ValueError, match="beyond the end of the epoch"):
        resume_point(6, [3, 2])


def test_set_epoch_refuses_a_start_without_batch_size(shards):
    dataset = _stream(shards, rank=0)
    with pytest.raises(ValueError, match="batch_size"):
        dataset.set_epoch(0, start_batch=2)
    with pytest.raises(ValueError, match="start_batch must be >= 0"):
        dataset.set_epoch(0, start_batch=-1, batch_size=4)
