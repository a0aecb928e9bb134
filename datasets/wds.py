"""Image-text and audio-text pairs streamed from WebDataset tar shards.

A shard is a tar whose consecutive members ``<key>.<ext>`` form one sample, e.g. ``0001.jpg`` +
``0001.txt``. Only the members this dataset needs are read (image: jpg/jpeg/png/webp, audio:
wav/flac, caption: txt or the ``caption`` field of json) and they are decoded by this package's
own decoders; webdataset's automatic decoders are never used, because they unpickle ``.pyd`` /
``.pickle`` members, which runs arbitrary code from the data. ``pipe:`` URLs (which run a shell
command) are refused unless explicitly allowed.

A sample's ``.json`` member holds what is not its media or caption, as an index file's other
columns do (``pairs.py``): every field reaches the item's ``meta``, where the trainer's
``data.group_by`` finds it (or the caption). With ``hard_negatives``, the field
``hard_negatives_key`` holds the sample's wrong captions, e.g. ``0001.json`` = ``{"label": 3,
"hard_negatives": ["a blue circle", "a red square"]}``, read by ``read_hard_negatives``, the rule of
the index files: a non-empty list of captions, repeated in turn when shorter than asked, the first
``hard_negatives`` when longer; anything else (or no such field) skips the sample as
``bad_hard_negatives``.

Epochs. With ``resampled=True`` every DataLoader worker of every rank draws shards at random with
replacement (``webdataset.ResampledShards``), seeded by (seed, epoch, rank, worker), and the epoch
is cut at ``epoch_samples`` per rank, split exactly over the workers, so all ranks run the same
number of steps and DDP never waits on a rank that ran out of data. With ``resampled=False`` the
shard list, shuffled identically on every rank, is partitioned over ranks and then workers.
Call ``set_epoch(epoch)`` before each epoch (as with ``DistributedSampler``) for a new order.

Exact resume. Every stream is a pure function of (seed, epoch, rank, worker), and random
augmentation is seeded per item from its place in that stream, so ``set_epoch(epoch,
start_batch=b, batch_size=B)`` continues an epoch after its first ``b`` batches: each worker
skips, undecoded, the items of the batches it had delivered, the workers' turns go on from the
one that was due (a DataLoader takes one batch from each worker in turn), and the batches that
follow are bit for bit those of an uninterrupted run.

Broken data is skipped and counted: a bad sample comes back as a ``SkippedSample``; a shard that
cannot be read to the end (truncated, not a tar) logs a warning and yields one ``SkippedSample``
with reason ``corrupt_shard``, and the stream goes on with the next shard.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from polymodal.fileio import atomic_file

from .decode import DEFAULT_MAX_PIXELS, decode_audio, decode_caption, decode_image
from .pairs import read_hard_negatives
from .samples import (
    BAD_ENCODING,
    CORRUPT_SHARD,
    EMPTY_SHARD,
    MISSING_CAPTION,
    MISSING_FILE,
    SampleError,
    SkippedSample,
)
from .seeding import mix_seed, seeded_rng

__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "WebDatasetPairs", "expand_shard_urls", "write_wds_shards"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("wav", "flac")
CAPTION_EXTENSIONS = ("txt", "json")


def expand_shard_urls(urls: str | os.PathLike | Sequence[str | os.PathLike], allow_pipe: bool = False) -> list[str]:
    """Expand brace patterns (``shards-{0000..0099}.tar``) and ``::``-joined lists into shard URLs.

    Args:
        urls: one pattern or a list of them; local paths or URLs webdataset can open.
        allow_pipe: accept ``pipe:`` URLs, which run a shell command to produce the shard.

    Raises:
        ValueError: no URL, or a ``pipe:`` URL without ``allow_pipe``.
        FileNotFoundError: local shard files that do not exist.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    expanded = [url for pattern in patterns for url in wds.shardlists.expand_urls(os.fspath(pattern))]
    if not expanded:
        raise ValueError("no shard URLs given")
    for url in expanded:
        if url.startswith("pipe:") and not allow_pipe:
            raise ValueError(
                f"refusing the shell-command shard URL {url!r}; pass allow_pipe=True if you wrote it yourself"
            )
    missing = [url for url in expanded if _local_path(url) is not None and not _local_path(url).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shard files not found: {missing[:3]}{more}")
    return expanded


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    # A one-letter scheme is a Windows drive ("C:/shards/0.tar").
    return Path(url) if parsed.scheme == "" or len(parsed.scheme) == 1 else None


def _open_shard(url: str):
    local = _local_path(url)
    return open(local, "rb") if local is not None else wds.gopen(url, "rb")


def _share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` near-equal whole parts that sum to ``total``."""
    return total // parts + (1 if index < total % parts else 0)


def resume_point(start_batch: int, batches_per_worker: Sequence[int | None]) -> tuple[list[int], int]:
    """Where a DataLoader over an iterable dataset stands after its first ``start_batch`` batches.

    It takes one batch from each worker in turn, in worker order, and passes over a worker once
    that has run out; ``batches_per_worker`` is each worker's total (``None``: it never runs out).

    Returns:
        How many batches each worker had delivered, and the worker that delivers the next one.
    """
    delivered = [0] * len(batches_per_worker)
    last = -1  # the worker that delivered the most recent batch of an unfinished turn
    remaining = start_batch
    while remaining > 0:
        active = [w for w, total in enumerate(batches_per_worker) if total is None or delivered[w] < total]
        if not active:
            raise ValueError(f"start_batch {start_batch} is beyond the end of the epoch ({sum(delivered)} batches)")
        left = [batches_per_worker[w] - delivered[w] for w in active if batches_per_worker[w] is not None]
        turns = min([remaining // len(active), *left])  # whole turns at once: cheap for long epochs
        if turns == 0:  # less than a whole turn is left
            for w in active[:remaining]:
                delivered[w] += 1
            last, remaining = active[remaining - 1], 0
        for w in active:
            delivered[w] += turns
        remaining -= turns * len(active)
    active = [w for w, total in enumerate(batches_per_worker) if total is None or delivered[w] < total]
    following = [w for w in active if w > last]
    return delivered, (following or active or [0])[0]


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.to_tensor(image)  # (3, H, W) in [0, 1]


class WebDatasetPairs(IterableDataset):
    """Stream (image or audio, caption) pairs from WebDataset shards.

    Items are ``{"image": (3, H, W) | "audio": (num_samples,), "text": (context_length,), "meta":
    {...}}`` or ``SkippedSample``; ``meta`` holds the caption, the sample key, the shard URL and the
    other fields of the sample's json member. With ``hard_negatives`` they also have
    ``"text_negatives"`` ``(hard_negatives, context_length)``. Batch them with ``collate_samples``.

    Args:
        urls: shard paths or URLs, as a list or a brace pattern.
        modality: ``"image"`` or ``"audio"``.
        transform: images only: PIL RGB image -> ``(3, H, W)`` tensor; ``to_tensor`` by default.
        tokenizer: caption -> ``LongTensor (1, context_length)`` (or ``(context_length,)``).
        sample_rate: audio only: output rate in Hz.
        clip_seconds: audio only: output length in seconds.
        resampled: draw shards with replacement, forever, and cut epochs at ``epoch_samples``.
        epoch_samples: items per epoch on each rank (summed over its DataLoader workers); required
            with ``resampled=True``. With ``resampled=False`` the rank's shards are cycled to reach
            it, or read once when it is ``None``. Each worker batches its own share, so make it a
            multiple of ``batch_size * num_workers`` for full batches only (and for
            ``len(DataLoader)`` to be exact).
        shuffle_buffer: items held for shuffling; 0 or 1 keeps shard order.
        seed: base seed; the streams differ by epoch, rank and worker.
        max_pixels: images with more pixels are skipped (``too_many_pixels``) without being decoded.
        random_crop: audio only: crop long clips at a random offset instead of the centre.
        silence_threshold: audio only: clips with a lower peak amplitude are skipped as silent.
        allow_pipe: accept ``pipe:`` URLs, which run a shell command.
        rank: this process's rank; by default from ``RANK``/``WORLD_SIZE`` or ``torch.distributed``.
        world_size: number of ranks; give it together with ``rank``.
        hard_negatives: give each item this many wrong captions, tokenized as ``"text_negatives"``, from
            the ``hard_negatives_key`` field of its json member (see ``read_hard_negatives``); a sample
            without a list of captions there is skipped (``bad_hard_negatives``).
        hard_negatives_key: the json field holding them.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        modality: str = "image",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        tokenizer: Callable[[str], torch.Tensor],
        sample_rate: int | None = None,
        clip_seconds: float | None = None,
        resampled: bool = True,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        random_crop: bool = False,
        silence_threshold: float = 1e-4,
        allow_pipe: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        hard_negatives: int = 0,
        hard_negatives_key: str = "hard_negatives",
    ) -> None:
        super().__init__()
        if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
            raise ValueError(f"hard_negatives must be a non-negative integer, got {hard_negatives!r}")
        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
        if modality == "audio" and (sample_rate is None or clip_seconds is None):
            raise ValueError("modality='audio' needs sample_rate and clip_seconds")
        if resampled and epoch_samples is None:
            raise ValueError("resampled=True streams forever: give epoch_samples (items per epoch on each rank)")
        if epoch_samples is not None and epoch_samples <= 0:
            raise ValueError(f"epoch_samples must be positive, got {epoch_samples}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.urls = expand_shard_urls(urls, allow_pipe=allow_pipe)
        self.modality = modality
        self.transform = transform if transform is not None else _image_to_tensor
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.num_samples = round(clip_seconds * sample_rate) if modality == "audio" else None
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_pixels = max_pixels
        self.random_crop = random_crop
        self.silence_threshold = silence_threshold
        self.rank = rank
        self.world_size = world_size
        self.hard_negatives, self.hard_negatives_key = hard_negatives, hard_negatives_key
        self.epoch = 0
        self.start_batch, self.batch_size = 0, None
        self.corrupt_shards = 0  # counted in the process that iterates (each DataLoader worker has its own)
        media = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
        self._media_extensions = media
        self._wanted = frozenset(media + CAPTION_EXTENSIONS)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if state["rank"] is None:
            # DataLoader workers started with spawn or forkserver do not inherit torch.distributed,
            # so they would all think they are rank 0: pin the rank of the process that pickles
            # this dataset for them (the trainer's).
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
            if world_size > 1:
                state["rank"], state["world_size"] = rank, world_size
        return state

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int | None = None) -> None:
        """Set the epoch that seeds the next iteration (shard draws, shuffling, augmentation).

        Args:
            epoch: the epoch.
            start_batch: resume the epoch after this many batches of its DataLoader; only the
                next iteration starts there.
            batch_size: the DataLoader's batch size (with ``drop_last=True``, as the trainer
                uses), needed with ``start_batch``.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if start_batch and (batch_size is None or batch_size <= 0):
            raise ValueError(f"start_batch={start_batch} needs the DataLoader's positive batch_size, got {batch_size}")
        self.epoch = int(epoch)
        self.start_batch, self.batch_size = int(start_batch), batch_size

    def _resume(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(the stream this DataLoader worker plays, how many of its items were already delivered).

        A fresh DataLoader starts its turns at worker 0, but the epoch continues with whichever
        worker was due next: worker ``w`` plays stream ``(w + next) % num_workers``, so the turns
        go on in their old order.
        """
        if not self.start_batch:
            return worker, 0
        totals = [
            None if self.epoch_samples is None else _share(self.epoch_samples, num_workers, w) // self.batch_size
            for w in range(num_workers)
        ]
        delivered, due = resume_point(self.start_batch, totals)
        stream = (worker + due) % num_workers
        return stream, delivered[stream] * self.batch_size

    def __len__(self) -> int:
        if self.epoch_samples is None:
            raise TypeError("WebDatasetPairs has no length without epoch_samples")
        return self.epoch_samples

    def _topology(self) -> tuple[int, int, int, int]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size
        return rank, world_size, worker, num_workers

    def __iter__(self) -> Iterator[dict | SkippedSample]:
        rank, world_size, loader_worker, num_workers = self._topology()
        epoch = self.epoch
        worker, skip = self._resume(loader_worker, num_workers)
        self.epoch += 1  # a persistent worker, or the main process, moves on by itself
        self.start_batch = 0
        if self.resampled:
            shards = wds.ResampledShards(
                self.urls,
                seed=wds.utils.make_seed(self.seed, epoch),
                worker_seed=lambda: rank * 100_003 + worker,
                deterministic=True,
            )
            urls: Iterable[str] = (shard["url"] for shard in shards)
        else:
            order = list(self.urls)
            # Same shuffle on every rank and worker, so the slices below partition the shards.
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            mine = order[rank::world_size][worker::num_workers]
            if not mine:
                if self.epoch_samples is not None:
                    raise ValueError(
                        f"{len(order)} shards cannot feed {world_size} ranks x {num_workers} workers; "
                        f"use resampled=True or more shards"
                    )
                logger.warning("rank %d worker %d got none of the %d shards", rank, worker, len(order))
            urls = itertools.cycle(mine) if self.epoch_samples is not None and mine else mine
        raw = (item for url in urls for item in self._read_shard(url))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker}")
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(raw)
        stop = None if self.epoch_samples is None else _share(self.epoch_samples, num_workers, worker)
        # Skipped items are read but not decoded; each item's place seeds its augmentation.
        raw = itertools.islice(enumerate(raw), skip, stop)
        seed = (self.seed, epoch, rank, worker)
        return (item if isinstance(item, SkippedSample) else self._decode(item, mix_seed(*seed, i)) for i, item in raw)

    def _wants(self, name: str) -> bool:
        key, ext = base_plus_ext(name)
        return key is not None and ext.lower() in self._wanted

    def _read_shard(self, url: str) -> Iterator[dict | SkippedSample]:
        """Group a shard's wanted members into raw samples ``{"__key__", "__url__", ext: bytes}``."""
        current: dict | None = None
        count = 0
        try:
            with _open_shard(url) as stream:
                # Only the wanted members are read at all; anything else is skipped in the tar stream.
                for member in tar_file_iterator(stream, select_files=self._wants):
                    key, ext = base_plus_ext(member["fname"])
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            count += 1
                            yield current
                        current = {"__key__": key, "__url__": url}
                    current[ext.lower()] = member["data"]
        except Exception as err:
            # tarfile.ReadError, EOFError, OSError, zlib.error: the rest of this shard is lost. The
            # members already grouped were read whole (a failed read never reaches the group), so
            # the last group goes on to decoding, which skips it if a member it needs is missing.
            if current is not None:
                count += 1
                yield current
            self.corrupt_shards += 1
            logger.warning("skipping the rest of shard %s after %d samples: %s", url, count, err)
            yield SkippedSample(CORRUPT_SHARD, f"{url}: unreadable after {count} samples: {type(err).__name__}: {err}")
            return
        if current is not None:
            count += 1
            yield current
        if count == 0:
            yield SkippedSample(EMPTY_SHARD, f"{url}: no member with extension {sorted(self._wanted)}")

    def _caption(self, raw: Mapping[str, bytes]) -> tuple[str, dict]:
        fields: dict = {}
        if "json" in raw:
            try:
                parsed = json.loads(raw["json"].decode("utf-8"))
            except UnicodeDecodeError as err:
                if "txt" not in raw:
                    raise SampleError(BAD_ENCODING, f"json member is not UTF-8: {err}") from err
            except json.JSONDecodeError as err:
                if "txt" not in raw:
                    raise SampleError(MISSING_CAPTION, f"json member is not valid JSON ({err.msg})") from err
            else:
                if isinstance(parsed, dict):
                    fields = parsed
                elif "txt" not in raw:
                    raise SampleError(MISSING_CAPTION, f"json member is a {type(parsed).__name__}, expected an object")
        if "txt" in raw:
            caption = decode_caption(raw["txt"])
        elif "caption" in fields:
            caption = decode_caption(fields["caption"])
        else:
            raise SampleError(MISSING_CAPTION, "no txt member and no 'caption' field in a json member")
        return caption, {key: value for key, value in fields.items() if key != "caption"}

    def _decode(self, raw: dict, seed: int) -> dict | SkippedSample:
        with seeded_rng(seed):
            return self._decode_seeded(raw)

    def _decode_seeded(self, raw: dict) -> dict | SkippedSample:
        where = f"{raw['__url__']}:{raw['__key__']}"
        try:
            caption, extras = self._caption(raw)
            negatives = (
                read_hard_negatives(
                    extras.get(self.hard_negatives_key), self.hard_negatives, self.hard_negatives_key, "json field"
                )
                if self.hard_negatives
                else []
            )
            ext = next((ext for ext in self._media_extensions if ext in raw), None)
            if ext is None:
                raise SampleError(MISSING_FILE, f"no {'/'.join(self._media_extensions)} member")
            if self.modality == "image":
                item = {"image": self.transform(decode_image(raw[ext], self.max_pixels))}
            else:
                audio = decode_audio(
                    raw[ext], self.sample_rate, self.num_samples, self.random_crop, self.silence_threshold
                )
                item = {"audio": audio}
        except SampleError as err:
            return SkippedSample(err.reason, f"{where}: {err.detail}")
        item["text"] = self._tokens(caption)  # (context_length,)
        if negatives:
            item["text_negatives"] = torch.stack([self._tokens(c) for c in negatives])  # (n, context_length)
        item["meta"] = {**extras, "caption": caption, "key": raw["__key__"], "url": raw["__url__"]}
        return item

    def _tokens(self, caption: str) -> torch.Tensor:
        tokens = self.tokenizer(caption)
        return tokens[0] if tokens.ndim == 2 else tokens

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shards={len(self.urls)}, modality={self.modality!r}, "
            f"resampled={self.resampled}, epoch_samples={self.epoch_samples})"
        )


def _sample_members(sample: Mapping[str, bytes | str], index: int) -> list[tuple[str, bytes]]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or key.startswith("/") or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(
            f"sample {index}: '__key__' must be a non-empty relative name without dots "
            f"(the first dot starts the extension), got {key!r}"
        )
    members = []
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if not ext or "/" in ext or ext.startswith("."):
            raise ValueError(f"sample {index} ({key}): bad extension {ext!r}; expected e.g. 'jpg' or 'txt'")
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"sample {index} ({key}): member {ext!r} is a {type(value).__name__}; expected bytes or str "
                f"(encode it first: this writer never pickles)"
            )
        members.append((f"{key}.{ext}", bytes(value)))
    if not members:
        raise ValueError(f"sample {index} ({key}) has no members besides '__key__'")
    return members


def write_wds_shards(
    samples: Iterable[Mapping[str, bytes | str]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_count: int = 1000,
    overwrite: bool = False,
) -> list[Path]:
    """Write samples into WebDataset tar shards ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ...

    Each shard is written under a temporary name and renamed into place when complete, so a
    reader never sees a half-written shard.

    Args:
        samples: dicts of ``{"__key__": name, extension: bytes or str}``, e.g.
            ``{"__key__": "0001", "jpg": ..., "txt": "a cat"}``; str values are written as UTF-8.
        out_dir: folder for the shards (created if missing).
        prefix: shard file name prefix.
        max_count: samples per shard.
        overwrite: replace existing ``<prefix>-*.tar`` shards in ``out_dir`` (stale ones are removed).

    Returns:
        The shard paths, in order.

    Raises:
        FileExistsError: shards with this prefix exist and ``overwrite`` is false.
    """
    if max_count <= 0:
        raise ValueError(f"max_count must be positive, got {max_count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards {[p.name for p in existing[:3]]}; pass overwrite=True")
    paths: list[Path] = []
    numbered = iter(enumerate(samples))
    # Each pass of this loop writes one shard: the first sample, then up to max_count - 1 more.
    for first in numbered:
        final = out_dir / f"{prefix}-{len(paths):06d}.tar"
        # Existing shards were refused above unless overwrite is set, and then are replaced.
        with atomic_file(final, overwrite=True) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for index, sample in itertools.chain([first], itertools.islice(numbered, max_count - 1)):
                for name, data in _sample_members(sample, index):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o444
                    info.mtime = 0  # reproducible shards: the same samples give the same bytes
                    tar.addfile(info, io.BytesIO(data))
        paths.append(final)
    for stale in set(existing) - set(paths):
        stale.unlink()
    return paths
