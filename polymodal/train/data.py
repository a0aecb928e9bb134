"""Building the training and evaluation data of a run: datasets, a resumable sampler, loaders."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from polymodal.datasets import collate_samples
from polymodal.datasets.seeding import mix_seed, seeded_rng
from polymodal.errors import ConfigError

from .config import DataSection

__all__ = [
    "ResumableSampler",
    "RunData",
    "SeededSamples",
    "build_datasets",
    "make_loader",
    "mix_seed",
    "select_rows",
]


class SeededSamples(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) around each sample, so random augmentation is the same
    whichever worker loads it and however far into the epoch a resumed run starts."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded_rng(mix_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """Shuffles per epoch from (seed, epoch), splits each *global* batch into contiguous per-rank slices,
    drops the incomplete last global batch, and can start at any batch of an epoch.

    With this split, the union of the ranks' i-th local batches is exactly the i-th global batch a
    single process would see, which makes N-rank and 1-rank runs comparable step for step.
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"data.batch_size {global_batch} must be divisible by the number of ranks {world_size}")
        if size < global_batch:
            raise ValueError(f"the dataset has {size} samples, fewer than one batch of {global_batch}")
        self.size, self.global_batch, self.rank, self.world_size, self.seed = size, global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.size, generator=g)
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.local_batch
            yield from order[start : start + self.local_batch].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch


@dataclass
class RunData:
    """The datasets of a run and what evaluation needs to know about them."""

    train: Dataset | None  # None when built for evaluation only
    eval: Dataset | None
    modalities: tuple[str, ...]
    zero_shot: dict[str, tuple[list[str], list[str]]]  # attribute -> (class names, templates)
    unseen_key: str | None  # meta key that marks held-out samples with unseen combinations


def _check_builtin_options(cls: type, options: dict[str, Any]) -> None:
    allowed = set(inspect.signature(cls).parameters) - {"split", "n", "seed", "transform", "tokenizer"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"data.builtin has unknown options {unknown} for {cls.__name__}; expected some of {sorted(allowed)}"
        )


def select_rows(dataset, size: int | None, seed: int, role: str, key: str):
    """Keep ``size`` rows of an index dataset, drawn at random from ``seed``; all of them for ``None``.

    A random draw, not the first rows, because index files are often sorted (by class, by source),
    and a seeded one, so every run and every rank keeps the same rows. The rows come in the order
    drawn, so a larger size keeps the same rows and more.
    """
    if size is None:
        return dataset
    if size > len(dataset.rows):
        raise ConfigError(
            f"data.{key} is {size}, but {dataset.index_path} has {len(dataset.rows)} rows; "
            f"expected at most {len(dataset.rows)} (or leave data.{key} unset for all of them)"
        )
    order = torch.randperm(len(dataset.rows), generator=torch.Generator().manual_seed(mix_seed(seed, "rows", role)))
    dataset.rows = [dataset.rows[i] for i in order[:size].tolist()]
    return dataset


def build_datasets(
    cfg: DataSection, model_config, tokenizer, train_transform, eval_transform, with_train: bool = True
) -> RunData:
    """Datasets for ``cfg.source``; the built-in sources also bring their zero-shot prompts.

    Image sizes, sample rates and clip lengths come from ``model_config.input_spec``. With an index
    file (``csv``), ``data.train_size`` / ``data.eval_size`` keep that many rows, drawn at random
    from ``data.seed`` (``select_rows``); shards (``wds``) are streamed, so there they are refused
    (``data.epoch_samples`` sets an epoch's length).

    ``with_train=False`` builds the held-out split only (``RunData.train`` is ``None``), for evaluation.
    """
    from polymodal import datasets as pd

    if cfg.source in ("shapes", "tones"):
        _check_builtin_options(pd.ShapesDataset if cfg.source == "shapes" else pd.TonesDataset, cfg.builtin)

    if cfg.source == "shapes":
        height, width = model_config.input_spec("image").image_size
        if height != width:
            raise ConfigError(f"the built-in shapes are square, but the model takes {height}x{width} images")
        options = {"image_size": height, "tokenizer": tokenizer, **cfg.builtin}
        train = (
            pd.ShapesDataset(
                "train",
                cfg.generated_size("train_size"),
                cfg.seed,
                transform=train_transform,
                hard_negatives=cfg.hard_negatives,
                **options,
            )
            if with_train
            else None
        )
        held = pd.ShapesDataset(
            "heldout", cfg.generated_size("eval_size"), cfg.seed, transform=eval_transform, **options
        )
        return RunData(
            train, held, ("image", "text"), {"shape": pd.shape_prompts(), "colour": pd.colour_prompts()}, "unseen"
        )
    if cfg.source == "tones":
        audio = model_config.input_spec("audio")
        options = {
            "sample_rate": audio.sample_rate,
            "clip_seconds": audio.clip_seconds,
            "tokenizer": tokenizer,
            **cfg.builtin,
        }
        train = pd.TonesDataset("train", cfg.generated_size("train_size"), cfg.seed, **options) if with_train else None
        held = pd.TonesDataset("heldout", cfg.generated_size("eval_size"), cfg.seed, **options)
        return RunData(train, held, ("audio", "text"), pd.tone_prompts(), "unseen")
    modality = model_config.query_modality
    spec = model_config.input_spec(modality)
    if cfg.source == "csv":

        def make(path, transform, role):
            # hard negatives train; the held-out split is scored without them
            negatives = {"hard_negatives": cfg.hard_negatives if role == "train" else 0}
            negatives["hard_negatives_key"] = cfg.hard_negatives_key
            if modality == "image":
                dataset = pd.ImageTextDataset(
                    path, transform, tokenizer, image_key=cfg.image_key, caption_key=cfg.caption_key, **negatives
                )
            else:
                dataset = pd.AudioTextDataset(
                    path,
                    tokenizer,
                    spec.sample_rate,
                    spec.clip_seconds,
                    audio_key=cfg.audio_key,
                    caption_key=cfg.caption_key,
                    **negatives,
                )
            key = f"{role}_size"
            return select_rows(dataset, getattr(cfg, key), cfg.seed, role, key)

        return RunData(
            make(cfg.train, train_transform, "train") if with_train else None,
            make(cfg.eval, eval_transform, "eval") if cfg.eval else None,
            (modality, "text"),
            {},
            None,
        )
    for key in ("train_size", "eval_size"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"data.{key} does not apply to streamed shards (data.source=wds); "
                "set data.epoch_samples for the samples an epoch takes"
            )

    def stream(urls, transform, role):
        return pd.WebDatasetPairs(
            urls,
            modality=modality,
            transform=transform,
            tokenizer=tokenizer,
            sample_rate=spec.sample_rate,
            clip_seconds=spec.clip_seconds,
            resampled=role == "train",
            epoch_samples=cfg.epoch_samples if role == "train" else None,
            # Rank 0 evaluates alone, on every held-out shard, each read once in order: an epoch length would
            # cycle them, a shuffle buffer then scores some samples twice and others never, and the ranks'
            # partition would leave out the other ranks' shards.
            **({} if role == "train" else {"shuffle_buffer": 0, "rank": 0, "world_size": 1}),
            seed=cfg.seed,
            # as for an index: hard negatives train, the held-out split is scored without them
            hard_negatives=cfg.hard_negatives if role == "train" else 0,
            hard_negatives_key=cfg.hard_negatives_key,
        )

    return RunData(
        stream(cfg.train, train_transform, "train") if with_train else None,
        stream(cfg.eval, eval_transform, "eval") if cfg.eval else None,
        (modality, "text"),
        {},
        None,
    )


def make_loader(
    dataset: Dataset,
    local_batch: int,
    num_workers: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of ``collate_samples`` batches. ``drop_last`` drops a stream's last partial batch (the
    trainer's streamed epochs, whose batches are counted for resume); evaluation and feature extraction keep
    every sample. A map-style dataset's batches come from ``sampler``."""
    iterable = isinstance(dataset, IterableDataset)
    return DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=None if iterable else sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        drop_last=drop_last and iterable,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
