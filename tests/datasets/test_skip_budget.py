"""collate_samples, Batch, SkipBudget and the rate-limited skip logger."""

import logging
import pickle

import pytest
import torch

from polymodal.datasets.samples import (
    Batch,
    SkipBudget,
    SkipBudgetExceeded,
    SkipLogger,
    SkippedSample,
    TooManyBadSamples,
    collate_samples,
    log_skips,
)
from polymodal.errors import InputError


def _item(i: int) -> dict:
    return {
        "image": torch.full((3, 4, 4), float(i)),
        "text": torch.arange(5) + i,
        "label": torch.tensor(i),
        "meta": {"caption": f"caption {i}"},
    }


def _batch(good: int, skipped: dict[str, int]) -> Batch:
    items = [_item(i) for i in range(good)]
    items += [SkippedSample(reason, f"file {n}") for reason, count in skipped.items() for n in range(count)]
    return collate_samples(items)


def test_collate_stacks_good_items_and_counts_skips():
    items = [
        _item(0),
        SkippedSample("corrupt_image", "a.jpg"),
        _item(1),
        SkippedSample("empty_caption", "row 3"),
        SkippedSample("corrupt_image", "b.jpg"),
        _item(2),
    ]
    batch = collate_samples(items)
    assert len(batch) == 3 and batch.num_seen == 6 and batch.num_skipped == 3
    assert batch.inputs["image"].shape == (3, 3, 4, 4)
    assert batch.inputs["text"].tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    assert batch.inputs["label"].tolist() == [0, 1, 2]
    assert [m["caption"] for m in batch.meta] == ["caption 0", "caption 1", "caption 2"]
    assert batch.skipped == {"corrupt_image": 2, "empty_caption": 1}
    assert [s.detail for s in batch.skipped_samples] == ["a.jpg", "row 3", "b.jpg"]
    # Crosses process boundaries from DataLoader workers.
    again = pickle.loads(pickle.dumps(batch))
    assert torch.equal(again.inputs["image"], batch.inputs["image"]) and again.skipped == batch.skipped


def test_all_skipped_batch_is_empty_but_valid():
    batch = collate_samples([SkippedSample("missing_file", "x"), SkippedSample("missing_file", "y")])
    assert len(batch) == 0 and batch.inputs == {} and batch.meta == []
    assert batch.num_seen == 2 and batch.skipped == {"missing_file": 2}
    assert len(batch.to("cpu")) == 0


def test_collate_refuses_mismatched_items():
    other = _item(1)
    del other["label"]
    with pytest.raises(ValueError, match="keys"):
        collate_samples([_item(0), other])
    wide = _item(1)
    wide["image"] = torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match="'image'.*different shapes"):
        collate_samples([_item(0), wide])


def test_batch_to_moves_tensors_and_keeps_the_rest():
    batch = _batch(2, {"zero_bytes": 1})
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, Batch)
    assert moved.inputs.keys() == batch.inputs.keys()
    assert moved.inputs["text"].dtype == torch.long
    assert moved.skipped == {"zero_bytes": 1} and moved.num_seen == 3 and moved.meta == batch.meta
    moved64 = Batch({k: v.double() for k, v in batch.inputs.items()}, batch.meta, batch.skipped, batch.num_seen)
    assert moved64.to("cpu").inputs["image"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs a CUDA device")
def test_pin_memory_and_to_cuda():
    batch = _batch(2, {"zero_bytes": 1}).pin_memory()
    assert all(t.is_pinned() for t in batch.inputs.values())
    on_gpu = batch.to("cuda", non_blocking=True)
    assert all(t.is_cuda for t in on_gpu.inputs.values()) and on_gpu.skipped == {"zero_bytes": 1}


def test_budget_raises_naming_the_commonest_reasons():
    budget = SkipBudget(max_fraction=0.1, min_samples=200, log_interval=None)
    # 8 batches of 100: 700 good, 60 corrupt images, 40 empty captions -> 12.5% skipped.
    for _ in range(7):
        budget.update(_batch(100, {}))
    with pytest.raises(TooManyBadSamples) as info:
        budget.update(
            collate_samples([SkippedSample("corrupt_image", "x")] * 60 + [SkippedSample("empty_caption", "")] * 40)
        )
    message = str(info.value)
    assert message == (
        "the data: 12.5% of 800 samples were skipped, over the budget of 10% (raise max_fraction to allow more): "
        "corrupt_image 60 (e.g. x), empty_caption 40"
    )
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, InputError)
    assert TooManyBadSamples is SkipBudgetExceeded  # the former name still catches it
    summary = budget.summary()
    assert summary["seen"] == 800 and summary["skipped"] == 100
    assert summary["by_reason"] == {"corrupt_image": 60, "empty_caption": 40}
    assert summary["fraction"] == pytest.approx(0.125)


def test_budget_does_not_raise_under_budget_or_before_min_samples():
    budget = SkipBudget(max_fraction=0.1, min_samples=200, log_interval=None)
    budget.update(_batch(0, {"corrupt_image": 50}))  # 100% skipped, but only 50 seen
    budget.update(_batch(100, {"corrupt_image": 10}))  # 60 of 160: still before min_samples
    assert budget.seen == 160
    budget.update(_batch(440, {}))  # 60 of 600 = 10%: at the budget, not over it
    for _ in range(5):
        budget.update(_batch(100, {"empty_caption": 5}))  # 85 of 1125 = 7.6%
    assert budget.fraction == pytest.approx(85 / 1125)
    # Exactly at the budget is still allowed; one more skip goes over.
    exact = SkipBudget(max_fraction=0.5, min_samples=4, log_interval=None)
    exact.update(_batch(2, {"zero_bytes": 2}))
    with pytest.raises(TooManyBadSamples, match="60.0% of 5 samples"):
        exact.update(_batch(0, {"zero_bytes": 1}))


def test_budget_validates_its_arguments():
    with pytest.raises(ValueError, match="max_fraction"):
        SkipBudget(max_fraction=1.5)
    with pytest.raises(ValueError, match="min_samples"):
        SkipBudget(min_samples=-1)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_skip_logger_logs_each_reason_at_most_once_per_interval(caplog):
    clock = _Clock()
    log = logging.getLogger("polymodal.test.skips")
    skip_logger = SkipLogger(interval=10.0, log=log, clock=clock)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert skip_logger(_batch(1, {"corrupt_image": 3, "empty_caption": 1})) == 2  # one per reason
        clock.now = 5.0
        assert skip_logger(_batch(1, {"corrupt_image": 4})) == 0  # within 10 s: suppressed
        clock.now = 10.5
        assert skip_logger(_batch(1, {"corrupt_image": 1})) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "corrupt_image" in messages[0] and "file 0" in messages[0] and "not logged" not in messages[0]
    assert "empty_caption" in messages[1]
    # 2 suppressed from the first batch and 4 from the second.
    assert "(6 more corrupt_image skips not logged)" in messages[2]


def test_budget_update_logs_rate_limited(caplog):
    budget = SkipBudget(max_fraction=1.0, min_samples=0, log_interval=60.0)
    with caplog.at_level(logging.WARNING, logger="polymodal.datasets.samples"):
        for _ in range(5):
            budget.update(_batch(1, {"missing_file": 2}))
    assert len([r for r in caplog.records if "missing_file" in r.getMessage()]) == 1


def test_log_skips_helper(caplog):
    with caplog.at_level(logging.WARNING, logger="polymodal.datasets.samples"):
        written = log_skips(_batch(1, {"reason_only_this_test_uses": 3}))
    assert written == 1
    assert sum("reason_only_this_test_uses" in r.getMessage() for r in caplog.records) == 1
