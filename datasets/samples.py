"""The sample and batch types every dataset returns, the collate function, and the skip budget.

A dataset item is a ``dict`` of tensors keyed by modality (``"image"`` ``(3, H, W)``, ``"audio"``
``(num_samples,)``, ``"text"`` ``(context_length,)``, ``"label"`` ``()``) plus ``"meta"``, a plain
dict of JSON-able extras. A sample that cannot be used comes back as a ``SkippedSample`` instead of
raising, so one bad file never kills a DataLoader worker; ``collate_samples`` drops it from the
batch and counts it, and ``SkipBudget`` stops training once too large a share of the data is bad,
naming the commonest reasons so the cause can be fixed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from polymodal.errors import InputError

__all__ = [
    "BAD_ENCODING",
    "CORRUPT_AUDIO",
    "CORRUPT_IMAGE",
    "CORRUPT_SHARD",
    "EMPTY_AUDIO",
    "EMPTY_CAPTION",
    "EMPTY_SHARD",
    "MALFORMED_ROW",
    "MISSING_CAPTION",
    "MISSING_FILE",
    "NONFINITE_AUDIO",
    "SILENT_AUDIO",
    "SKIP_REASONS",
    "TOO_MANY_PIXELS",
    "ZERO_BYTES",
    "Batch",
    "SampleError",
    "SkipBudget",
    "SkipBudgetExceeded",
    "SkipLogger",
    "SkippedSample",
    "TooManyBadSamples",
    "collate_samples",
    "log_skips",
]

logger = logging.getLogger(__name__)

# Why a sample was skipped. Stable strings: they appear in logs, summaries and error messages.
MISSING_FILE = "missing_file"
ZERO_BYTES = "zero_bytes"
CORRUPT_IMAGE = "corrupt_image"  # also truncated files
TOO_MANY_PIXELS = "too_many_pixels"
BAD_ENCODING = "bad_encoding"  # caption bytes are not UTF-8
MISSING_CAPTION = "missing_caption"  # None, NaN or absent
EMPTY_CAPTION = "empty_caption"  # empty or whitespace only
EMPTY_AUDIO = "empty_audio"
SILENT_AUDIO = "silent_audio"
NONFINITE_AUDIO = "nonfinite_audio"
CORRUPT_AUDIO = "corrupt_audio"
CORRUPT_SHARD = "corrupt_shard"  # a WebDataset tar that could not be read to the end
EMPTY_SHARD = "empty_shard"  # a WebDataset tar with no usable sample in it
MALFORMED_ROW = "malformed_row"  # an index row with missing or extra cells, bad JSON or a bad field
BAD_HARD_NEGATIVES = "bad_hard_negatives"  # a hard_negatives cell that is not a non-empty list of captions
SKIP_REASONS = (
    MISSING_FILE,
    ZERO_BYTES,
    CORRUPT_IMAGE,
    TOO_MANY_PIXELS,
    BAD_ENCODING,
    MISSING_CAPTION,
    EMPTY_CAPTION,
    EMPTY_AUDIO,
    SILENT_AUDIO,
    NONFINITE_AUDIO,
    CORRUPT_AUDIO,
    CORRUPT_SHARD,
    EMPTY_SHARD,
    BAD_HARD_NEGATIVES,
    MALFORMED_ROW,
)


class SampleError(Exception):
    """A sample that cannot be used; the decoders raise it and the datasets turn it into ``SkippedSample``.

    Args:
        reason: one of the reason codes (``SKIP_REASONS``).
        detail: what exactly was wrong, naming the file or key.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Exceptions pickle their ``args`` by default, which would lose the two fields.
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a dataset item that could not be used.

    Attributes:
        reason: the reason code (e.g. ``"corrupt_image"``).
        detail: a human-readable description naming the file or key.
    """

    reason: str
    detail: str


@dataclass
class Batch:
    """A collated batch: stacked tensors of the good items, their metadata, and what was skipped.

    Attributes:
        inputs: ``{key: (B, ...)}`` tensors, e.g. ``"image"`` ``(B, 3, H, W)`` and ``"text"`` ``(B, L)``;
            empty when every item was skipped.
        meta: one dict per good item, in the same order as the rows of ``inputs``.
        skipped: reason -> number of items skipped for it.
        num_seen: good plus skipped items.
        skipped_samples: the skipped items themselves, for logging their details.
    """

    inputs: dict[str, torch.Tensor]
    meta: list[dict]
    skipped: dict[str, int]
    num_seen: int
    skipped_samples: list[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def num_skipped(self) -> int:
        return self.num_seen - len(self)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            inputs={key: fn(value) for key, value in self.inputs.items()},
            meta=self.meta,
            skipped=self.skipped,
            num_seen=self.num_seen,
            skipped_samples=self.skipped_samples,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a batch whose tensors live on ``device`` (metadata and counts are shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Return a batch with page-locked tensors; ``DataLoader(pin_memory=True)`` calls this."""
        return self._map(lambda t: t.pin_memory())


def _stack(key: str, values: list) -> torch.Tensor:
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot collate {key!r}: items have different shapes {sorted(shapes)}; every item's "
                f"{key!r} must have the same shape (resize images / pad audio and text in the dataset)"
            )
        return torch.stack(values)
    if all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values)
    kinds = sorted({type(v).__name__ for v in values})
    raise TypeError(f"cannot collate {key!r}: expected tensors or numbers, got {kinds}; put extras in 'meta'")


def collate_samples(items: Sequence[Mapping | SkippedSample]) -> Batch:
    """Stack the good items of a list into a ``Batch`` and count the skipped ones.

    Every good item must have the same keys; each key except ``"meta"`` is stacked along a new
    first dimension. Picklable (a top-level function), so it works as a DataLoader ``collate_fn``
    with worker processes.

    Args:
        items: dataset items (dicts) and ``SkippedSample`` markers, in any mix.
    """
    good = [item for item in items if not isinstance(item, SkippedSample)]
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    inputs: dict[str, torch.Tensor] = {}
    if good:
        keys = [key for key in good[0] if key != "meta"]
        for index, item in enumerate(good):
            if not isinstance(item, Mapping):
                raise TypeError(f"collate_samples expects dicts or SkippedSample, got {type(item).__name__}")
            if set(item) - {"meta"} != set(keys):
                raise ValueError(
                    f"cannot collate: item {index} has keys {sorted(item)} but item 0 has {sorted(good[0])}"
                )
        inputs = {key: _stack(key, [item[key] for item in good]) for key in keys}
    return Batch(
        inputs=inputs,
        meta=[dict(item.get("meta") or {}) for item in good],
        skipped=dict(Counter(item.reason for item in skipped)),
        num_seen=len(items),
        skipped_samples=skipped,
    )


class SkipBudgetExceeded(InputError, RuntimeError):
    """More of the data was skipped than the ``SkipBudget`` allows: the data, not the code, is at fault.

    An ``InputError`` (so the command line prints it as one line); also a ``RuntimeError``, what it
    was before it had a place among polymodal's errors.
    """


TooManyBadSamples = SkipBudgetExceeded  # its former name


class SkipLogger:
    """Log skipped samples without flooding the log: each reason at most once per ``interval`` seconds.

    The message names one example and how many samples of that reason went unlogged since the
    previous message for it.

    Args:
        interval: seconds between two messages for the same reason.
        log: the logger written to; this module's by default.
        clock: returns the current time in seconds (injectable for tests).
    """

    def __init__(
        self,
        interval: float = 10.0,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.interval = float(interval)
        self.log = log or logger
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def __call__(self, skipped: Batch | Sequence[SkippedSample]) -> int:
        """Log the skips of a batch (or a list of ``SkippedSample``); return how many messages were written."""
        samples = skipped.skipped_samples if isinstance(skipped, Batch) else list(skipped)
        written = 0
        for sample in samples:
            now = self.clock()
            last = self._last.get(sample.reason)
            if last is not None and now - last < self.interval:
                self._suppressed[sample.reason] += 1
                continue
            suppressed = self._suppressed.pop(sample.reason, 0)
            extra = f" ({suppressed} more {sample.reason} skips not logged)" if suppressed else ""
            self.log.warning("skipped a sample (%s): %s%s", sample.reason, sample.detail, extra)
            self._last[sample.reason] = now
            written += 1
        return written


_default_skip_logger = SkipLogger()


def log_skips(batch: Batch) -> int:
    """Log a batch's skipped samples through a process-wide ``SkipLogger`` (each reason at most every 10 s)."""
    return _default_skip_logger(batch)


class SkipBudget:
    """Tolerate a bounded share of unusable samples; fail loudly beyond it.

    Call ``update(batch)`` for every batch. Once at least ``min_samples`` items have been seen and
    more than ``max_fraction`` of them were skipped, ``SkipBudgetExceeded`` is raised with one line
    naming the data, the share, the setting to change and the commonest reasons, e.g. ``train.csv:
    12.5% of 800 samples were skipped, over the budget of 10% (raise data.skip_budget to allow
    more): corrupt_image 60 (e.g. train.csv row 3: ...), empty_caption 40``. Skips are also logged,
    each reason at most once per ``log_interval``.

    Args:
        max_fraction: largest tolerated share of skipped samples, in [0, 1].
        min_samples: samples to see before judging, so a few early bad files do not stop a run.
        log_interval: seconds between two log messages for the same reason; ``None`` to not log.
        log: the logger written to.
        source: what the samples come from (an index file, shard pattern...), for the message.
        knob: the name of the setting ``max_fraction`` comes from, for the message.
    """

    def __init__(
        self,
        max_fraction: float = 0.1,
        min_samples: int = 200,
        log_interval: float | None = 10.0,
        log: logging.Logger | None = None,
        source: str | None = None,
        knob: str = "max_fraction",
    ) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        self.max_fraction = float(max_fraction)
        self.min_samples = int(min_samples)
        self.source = source
        self.knob = knob
        self.seen = 0
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # reason -> the detail of its first skip
        self.logger = None if log_interval is None else SkipLogger(log_interval, log)

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def update(self, batch: Batch) -> None:
        """Count a batch's seen and skipped items; raise ``SkipBudgetExceeded`` when over budget."""
        self.seen += batch.num_seen
        self.skipped += batch.num_skipped
        self.by_reason.update(batch.skipped)
        for sample in batch.skipped_samples:
            self.examples.setdefault(sample.reason, sample.detail)
        if self.logger is not None:
            self.logger(batch)
        if self.seen >= self.min_samples and self.fraction > self.max_fraction:
            raise SkipBudgetExceeded(self.message())

    def message(self) -> str:
        """One line: the data, the share skipped, the budget and its setting, the commonest reasons."""
        common = self.by_reason.most_common(5)
        reasons = [f"{reason} {count}" for reason, count in common]
        if common and common[0][0] in self.examples:
            example = " ".join(self.examples[common[0][0]].split())  # one line, whatever the detail holds
            reasons[0] += f" (e.g. {example[:200]})"
        return (
            f"{self.source or 'the data'}: {100 * self.fraction:.1f}% of {self.seen} samples were skipped, over "
            f"the budget of {100 * self.max_fraction:g}% (raise {self.knob} to allow more): "
            f"{', '.join(reasons) or 'no reasons recorded'}"
        )

    def summary(self) -> dict:
        """Counts so far, as a JSON-able dict."""
        return {
            "seen": self.seen,
            "skipped": self.skipped,
            "fraction": self.fraction,
            "max_fraction": self.max_fraction,
            "min_samples": self.min_samples,
            "by_reason": dict(self.by_reason.most_common()),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_fraction={self.max_fraction}, min_samples={self.min_samples})"
