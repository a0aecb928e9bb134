"""The run's data plumbing: per-sample seeding of augmentation, the resumable sampler, the datasets of a config."""

import pytest
import torch
from torch.utils.data import Dataset

from polymodal.errors import ConfigError
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


# ---------------------------------------------------------------- build_datasets


def _index(tmp_path, n: int = 30):
    from polymodal.datasets import write_synthetic

    return write_synthetic("shapes", tmp_path / "data", n=n, image_size=16, format="csv", progress=False)


def _build(data: dict, model: str = "clip-vit-tiny", **config):
    from polymodal import create_model, get_tokenizer
    from polymodal.encoders import image_transform
    from polymodal.train import TrainConfig
    from polymodal.train.data import build_datasets

    model_config = create_model(model).config
    for key, value in config.items():
        setattr(model_config.preprocess, key, value)
    cfg = TrainConfig.from_dict({"data": data}).data
    transform = image_transform(16, is_train=False)
    return build_datasets(cfg, model_config, get_tokenizer(model), transform, transform)


def test_csv_train_and_eval_size_keep_a_seeded_random_choice_of_rows(tmp_path):
    from polymodal.datasets import read_index

    index = str(_index(tmp_path))
    rows = read_index(index)
    everything = _build({"source": "csv", "train": index, "eval": index})
    assert everything.train.rows == everything.eval.rows == rows  # unset: every row

    # Both used to be ignored for index files, silently.
    data = _build({"source": "csv", "train": index, "eval": index, "train_size": 10, "eval_size": 5})
    assert len(data.train) == 10 and len(data.eval) == 5
    assert all(row in rows for row in data.train.rows) and len({r["image"] for r in data.train.rows}) == 10
    assert data.train.rows != rows[:10]  # drawn at random, not the head of a possibly sorted file
    assert data.train.rows[:5] != data.eval.rows  # each file draws its own
    again = _build({"source": "csv", "train": index, "train_size": 10})
    assert again.train.rows == data.train.rows  # the same rows in every run
    more = _build({"source": "csv", "train": index, "train_size": 20})
    assert more.train.rows[:10] == data.train.rows  # a larger size keeps the same rows and more
    other_seed = _build({"source": "csv", "train": index, "train_size": 10, "seed": 1})
    assert other_seed.train.rows != data.train.rows

    with pytest.raises(ConfigError, match=r"data.train_size is 31, but .*index.csv has 30 rows; expected at most 30"):
        _build({"source": "csv", "train": index, "train_size": 31})
    # A size equal to the built-in data's default is still a request, not "unset".
    with pytest.raises(ConfigError, match=r"data.eval_size is 1000, but .*index.csv has 30 rows"):
        _build({"source": "csv", "train": index, "eval": index, "eval_size": 1000})
    with pytest.raises(ConfigError, match=r"data.train_size is 20000, but .*index.csv has 30 rows"):
        _build({"source": "csv", "train": index, "train_size": 20000})


def test_streamed_shards_refuse_train_and_eval_size(tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_size does not apply to streamed shards .*data.epoch_samples"):
        _build({"source": "wds", "train": str(tmp_path / "s-{0..1}.tar"), "epoch_samples": 8, "eval_size": 10})
    with pytest.raises(ConfigError, match=r"data.train_size does not apply to streamed shards"):
        _build({"source": "wds", "train": str(tmp_path / "s-{0..1}.tar"), "epoch_samples": 8, "train_size": 20000})


def test_builtin_data_generates_its_default_sizes_when_unset():
    data = _build({"source": "shapes"})
    assert (len(data.train), len(data.eval)) == (20000, 1000)


def test_builtin_tones_follow_the_models_input_spec():
    from polymodal import create_model

    spec = create_model("clap-cnn-tiny").config.input_spec("audio")
    data = _build({"source": "tones", "train_size": 2, "eval_size": 2}, "clap-cnn-tiny", clip_seconds=0.5)
    # The clip length used to stay at the generator's default of 1 s, whatever the model takes.
    assert data.train[0]["audio"].shape == data.eval[0]["audio"].shape == (round(spec.sample_rate * 0.5),)
    assert data.modalities == ("audio", "text")
