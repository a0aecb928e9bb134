"""The run's data plumbing: per-sample seeding of augmentation and the resumable sampler."""

import pytest
import torch
from torch.utils.data import Dataset

from polymodal.train.data import ResumableSampler, SeededSamples, mix_seed


class _RandomItems(Dataset):
    """Each item draws from torch's global RNG, as torchvision's random transforms do."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4) + index


def test_seeded_samples_draw_from_a_per_sample_seed_and_restore_the_global_rng():
    data = SeededSamples(_RandomItems(), seed=3)
    data.set_epoch(2)
    torch.manual_seed(123)
    got = data[5]
    after = torch.rand(2)

    torch.manual_seed(mix_seed(3, 2, 5))
    expected = torch.rand(4) + 5
    torch.manual_seed(123)
    untouched = torch.rand(2)

    assert torch.equal(got, expected)
    assert torch.equal(after, untouched)  # the caller's RNG stream is not disturbed
    assert torch.equal(data[5], got)  # the same item whatever was drawn before
    data.set_epoch(3)
    assert not torch.equal(data[5], got)  # a new epoch gives new augmentation


def test_seeded_samples_restore_the_rng_when_the_dataset_raises():
    class Broken(_RandomItems):
        def __getitem__(self, index):
            torch.rand(10)
            raise OSError("bad file")

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.raises(OSError, match="bad file"):
        SeededSamples(Broken(), seed=0)[1]
    assert torch.equal(torch.rand(3), expected)


def test_resumable_sampler_splits_global_batches_across_ranks_and_resumes():
    size, batch = 50, 8
    single = list(ResumableSampler(size, batch, rank=0, world_size=1, seed=1))
    assert len(single) == (size // batch) * batch and len(set(single)) == len(single)
    ranks = [list(ResumableSampler(size, batch, rank=r, world_size=2, seed=1)) for r in range(2)]
    for b in range(size // batch):  # the union of the ranks' b-th local batches is the b-th global batch
        assert ranks[0][b * 4 : b * 4 + 4] + ranks[1][b * 4 : b * 4 + 4] == single[b * batch : (b + 1) * batch]

    resumed = ResumableSampler(size, batch, rank=0, world_size=1, seed=1)
    resumed.set_epoch(0, start_batch=2)
    assert list(resumed) == single[2 * batch :] and len(resumed) == len(single) - 2 * batch
    with pytest.raises(ValueError, match="divisible by the number of ranks 3"):
        ResumableSampler(size, batch, rank=0, world_size=3, seed=1)
