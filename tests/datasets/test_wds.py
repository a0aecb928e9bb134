"""WebDataset shards: the writer, decoding with our own decoders only, skips, corrupt shards, epochs and ranks."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from polymodal.datasets.samples import Batch, SkippedSample, collate_samples
from polymodal.datasets.wds import WebDatasetPairs, expand_shard_urls, write_wds_shards
from polymodal.encoders import CLIPTokenizer, image_transform

CONTEXT = 8


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(context_length=CONTEXT)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _wav(seconds: float, rate: int, amplitude: float = 0.5, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([wave] * channels, 1), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _keys(items) -> list:
    return [item["meta"]["key"] if isinstance(item, dict) else item.reason for item in items]


def _token_len(caption: str) -> torch.Tensor:
    return torch.tensor([[len(caption)]])  # a stand-in tokenizer: (1, context_length=1)


def _simple_shards(tmp_path, count: int, per_shard: int, prefix: str = "shard"):
    samples = [
        {"__key__": f"s{i:03d}", "png": _encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"), "txt": f"sample {i}"}
        for i in range(count)
    ]
    return write_wds_shards(samples, tmp_path / "shards", prefix=prefix, max_count=per_shard)


# ----------------------------------------------------------------------------------------- writer


def test_writer_splits_into_shards_atomically_and_reproducibly(tmp_path):
    paths = _simple_shards(tmp_path, 10, 4)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [p.name for p in paths]  # no temp files left
    with tarfile.open(paths[2]) as tar:
        assert tar.getnames() == ["s008.png", "s008.txt", "s009.png", "s009.txt"]
        assert tar.extractfile("s009.txt").read() == b"sample 9"
    first = paths[0].read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _simple_shards(tmp_path, 10, 4)
    again = write_wds_shards(
        [
            {"__key__": f"s{i:03d}", "png": _encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"), "txt": f"sample {i}"}
            for i in range(4)
        ],
        tmp_path / "shards",
        max_count=4,
        overwrite=True,
    )
    assert again == paths[:1] and paths[0].read_bytes() == first  # same samples, same bytes
    assert not paths[1].exists() and not paths[2].exists()  # stale shards of the old set are gone


def test_writer_refuses_bad_samples_and_leaves_no_partial_shard(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="without dots"):
        write_wds_shards([{"__key__": "a.b", "txt": "x"}], out)
    with pytest.raises(TypeError, match="never pickles"):
        write_wds_shards([{"__key__": "a", "txt": "x"}, {"__key__": "b", "cls": 3}], out)
    with pytest.raises(ValueError, match="no members"):
        write_wds_shards([{"__key__": "a"}], out)
    assert list(out.iterdir()) == []
    assert write_wds_shards([], out) == []


def test_url_expansion_and_refusals(tmp_path):
    paths = _simple_shards(tmp_path, 6, 2)
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    assert expand_shard_urls(pattern) == [str(p) for p in paths]
    assert expand_shard_urls([paths[0], str(paths[1])]) == [str(paths[0]), str(paths[1])]
    with pytest.raises(ValueError, match="allow_pipe=True"):
        WebDatasetPairs(f"pipe:cat {paths[0]}", tokenizer=str.split, epoch_samples=4)
    assert expand_shard_urls(f"pipe:cat {paths[0]}", allow_pipe=True) == [f"pipe:cat {paths[0]}"]
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        WebDatasetPairs(str(tmp_path / "missing.tar"), tokenizer=str.split, epoch_samples=4)
    with pytest.raises(ValueError, match="epoch_samples"):
        WebDatasetPairs(pattern, tokenizer=str.split, resampled=True)
    with pytest.raises(ValueError, match="sample_rate and clip_seconds"):
        WebDatasetPairs(pattern, "audio", tokenizer=str.split, epoch_samples=4)


# --------------------------------------------------------------------------------------- decoding


def test_decodes_jpg_txt_png_json_and_skips_bad_members(tmp_path, tokenizer):
    red_jpg = _encode(Image.new("RGB", (12, 10), (255, 0, 0)), "JPEG")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    samples = [
        {"__key__": "a", "jpg": red_jpg, "txt": "  a red box "},
        {
            "__key__": "b",
            "png": _encode(Image.new("LA", (8, 8), (0, 0)), "PNG"),
            "json": json.dumps({"caption": "white", "label": 4}),
        },
        {"__key__": "c", "jpg": red_jpg, "txt": "   "},
        {"__key__": "d", "jpg": _encode(noise, "JPEG")[:400], "txt": "cut"},
        {"__key__": "e", "txt": "an image was never written"},
        {"__key__": "f", "png": _encode(Image.new("RGB", (8, 8)), "PNG"), "json": json.dumps({"label": 1})},
        {"__key__": "g", "jpg": red_jpg, "txt": b"caf\xe9"},
        {
            "__key__": "h",
            "webp": _encode(Image.new("RGB", (8, 8), (0, 255, 0)), "WEBP"),
            "txt": "green",
            "json": b"{not json",
        },
        {"__key__": "i", "jpg": red_jpg, "json": b"{not json"},
    ]
    shard = write_wds_shards(samples, tmp_path)
    transform = image_transform(8, is_train=False, mean=0.0, std=1.0)
    dataset = WebDatasetPairs(shard, "image", transform, tokenizer=tokenizer, resampled=False, shuffle_buffer=0)
    items = list(dataset)
    assert _keys(items) == [
        "a",
        "b",
        "empty_caption",
        "corrupt_image",
        "missing_file",
        "missing_caption",
        "bad_encoding",
        "h",
        "missing_caption",
    ]
    a, b, h = items[0], items[1], items[7]
    assert a["image"].shape == (3, 8, 8) and torch.allclose(a["image"][:, 4, 4], torch.tensor([1.0, 0, 0]), atol=0.02)
    assert a["text"].shape == (CONTEXT,) and torch.equal(a["text"], tokenizer("a red box")[0])
    assert a["meta"] == {"caption": "a red box", "key": "a", "url": str(shard[0])}
    assert torch.allclose(b["image"], torch.ones(3, 8, 8))  # transparent LA composited on white
    assert b["meta"]["caption"] == "white" and b["meta"]["label"] == 4
    assert h["meta"]["caption"] == "green"  # txt wins; the broken json only loses its extras
    assert ":c: caption is empty" in items[2].detail and str(shard[0]) in items[2].detail
    batch = collate_samples(items)
    assert len(batch) == 3 and batch.num_seen == 9 and batch.inputs["image"].shape == (3, 3, 8, 8)


def test_audio_shards(tmp_path, tokenizer):
    samples = [
        {"__key__": "loud", "wav": _wav(0.5, 44100, channels=2), "txt": "a stereo tone"},
        {"__key__": "quiet", "wav": _wav(0.5, 16000, amplitude=0.0), "txt": "silence"},
        {"__key__": "flac", "flac": b"fLaC but nothing else", "txt": "broken"},
        {"__key__": "short", "wav": _wav(0.1, 16000), "json": json.dumps({"caption": "short"})},
    ]
    shard = write_wds_shards(samples, tmp_path)
    dataset = WebDatasetPairs(
        shard, "audio", tokenizer=tokenizer, sample_rate=16000, clip_seconds=0.25, resampled=False, shuffle_buffer=0
    )
    items = list(dataset)
    assert _keys(items) == ["loud", "silent_audio", "corrupt_audio", "short"]
    assert items[0]["audio"].shape == (4000,) and 0.45 < items[0]["audio"].abs().max() < 0.55
    assert items[3]["audio"].shape == (4000,) and torch.count_nonzero(items[3]["audio"][1700:]) == 0
    assert items[3]["meta"]["caption"] == "short"


class _SetsFlagWhenUnpickled:
    def __init__(self, flag_path: str):
        self.flag_path = flag_path

    def __reduce__(self):
        return (open, (self.flag_path, "w"))


def test_default_webdataset_decoders_are_never_used(tmp_path, tokenizer):
    flag = tmp_path / "unpickled.flag"
    payload = pickle.dumps(_SetsFlagWhenUnpickled(str(flag)))
    pickle.loads(payload).close()  # the payload is live: unpickling it creates the flag file
    assert flag.exists()
    flag.unlink()

    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    samples = [
        {"__key__": "a", "png": png, "txt": "kept", "pyd": payload, "pickle": payload},
        {"__key__": "b", "pyd": payload},  # nothing usable: not even a sample
        {"__key__": "c", "png": png, "json": json.dumps({"caption": "from json"}), "cls": b"3"},
    ]
    shard = write_wds_shards(samples, tmp_path / "shards")
    dataset = WebDatasetPairs(shard, tokenizer=tokenizer, resampled=False, shuffle_buffer=0)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert [m["caption"] for m in batch.meta] == ["kept", "from json"]
    assert batch.num_seen == 2
    assert not flag.exists()


def test_truncated_and_garbage_shards_are_skipped_and_counted(tmp_path, caplog):
    paths = _simple_shards(tmp_path, 9, 3)
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmember("s004.png").offset_data + 20
    paths[1].write_bytes(paths[1].read_bytes()[:cut])  # cut inside the second sample's image
    garbage = tmp_path / "shards" / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file " * 40)
    dataset = WebDatasetPairs([*paths, garbage], tokenizer=_token_len, resampled=False, shuffle_buffer=0, seed=3)
    with caplog.at_level("WARNING", logger="polymodal.datasets.wds"):
        items = list(dataset)
    keys = _keys(items)
    good = sorted(k for k in keys if k.startswith("s"))
    assert good == ["s000", "s001", "s002", "s003", "s006", "s007", "s008"]
    assert keys.count("corrupt_shard") == 2 and len(keys) == 9
    assert dataset.corrupt_shards == 2
    details = [item.detail for item in items if isinstance(item, SkippedSample)]
    assert any("shard-000001.tar: unreadable after 1 samples" in d for d in details)
    assert any("garbage.tar" in d for d in details)
    assert sum("skipping the rest of shard" in r.getMessage() for r in caplog.records) == 2
    assert items[0]["image"].shape == (3, 8, 8)  # default transform: to_tensor


# ------------------------------------------------------------------------------------ epochs, ranks


def test_resampled_epochs_have_exactly_epoch_samples_per_rank(tmp_path):
    paths = _simple_shards(tmp_path, 12, 4)
    streams = {}
    for rank in range(2):
        dataset = WebDatasetPairs(
            paths, tokenizer=_token_len, epoch_samples=10, shuffle_buffer=8, seed=5, rank=rank, world_size=2
        )
        assert len(dataset) == 10
        epochs = [_keys(dataset) for _ in range(3)]
        assert [len(e) for e in epochs] == [10, 10, 10]
        assert epochs[0] != epochs[1]  # a new epoch draws a new stream
        dataset.set_epoch(0)
        assert _keys(dataset) == epochs[0]  # deterministic given (seed, epoch, rank)
        streams[rank] = epochs[0]
    assert streams[0] != streams[1]  # seeded per rank
    # Simulated through the environment variables webdataset reads, as torchrun sets them.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        from_env = WebDatasetPairs(paths, tokenizer=_token_len, epoch_samples=10, shuffle_buffer=8, seed=5)
        assert _keys(from_env) == streams[1]
    finally:
        monkeypatch.undo()


def test_resampled_epoch_is_split_exactly_over_dataloader_workers(tmp_path):
    paths = _simple_shards(tmp_path, 12, 4)
    for rank in range(2):
        dataset = WebDatasetPairs(paths, tokenizer=_token_len, epoch_samples=11, seed=1, rank=rank, world_size=2)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
        for epoch in range(2):
            dataset.set_epoch(epoch)
            batches = list(loader)
            assert all(isinstance(b, Batch) for b in batches)
            assert sum(b.num_seen for b in batches) == 11  # 6 from one worker, 5 from the other
            assert sorted(b.num_seen for b in batches) == [1, 2, 4, 4]
            keys = [key for b in batches for key in (m["key"] for m in b.meta)]
            # The two workers draw different streams (seeded per worker), not one stream twice.
            assert [keys[i] for i in (0, 1, 2, 3)] != [keys[i] for i in (4, 5, 6, 7)]


def test_unresampled_shards_are_partitioned_over_ranks_and_workers(tmp_path):
    paths = _simple_shards(tmp_path, 16, 2)  # 8 shards
    seen = []
    for rank in range(2):
        dataset = WebDatasetPairs(
            paths, tokenizer=_token_len, resampled=False, shuffle_buffer=4, seed=2, rank=rank, world_size=2
        )
        loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_samples)
        seen.append(sorted(m["key"] for b in loader for m in b.meta))
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(16)]
    # epoch_samples without resampling cycles through the rank's shards to reach it.
    cycled = WebDatasetPairs(
        paths, tokenizer=_token_len, resampled=False, epoch_samples=13, seed=2, rank=0, world_size=2
    )
    keys = _keys(cycled)
    assert len(keys) == 13 and set(keys) == set(seen[0])
    with pytest.raises(ValueError, match="cannot feed 16 ranks"):
        list(WebDatasetPairs(paths, tokenizer=_token_len, resampled=False, epoch_samples=4, rank=9, world_size=16))


def test_rank_is_pinned_when_pickled_for_spawned_workers(tmp_path, monkeypatch):
    paths = _simple_shards(tmp_path, 4, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = WebDatasetPairs(paths, tokenizer=_token_len, epoch_samples=6, seed=4)
    expected = _keys(dataset)
    payload = pickle.dumps(dataset)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    copy = pickle.loads(payload)  # as a spawned worker, which sees no distributed state
    assert (copy.rank, copy.world_size) == (1, 2)
    copy.set_epoch(0)
    assert _keys(copy) == expected
    assert pickle.loads(pickle.dumps(dataset)).rank is None  # outside distributed runs nothing is pinned


def _distributed_worker(rank, init_file, shard_paths, out_dir):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    # Only the process group says which rank this is, as when a launcher other than torchrun is used.
    for name in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        dataset = WebDatasetPairs(shard_paths, tokenizer=_token_len, epoch_samples=9, seed=7)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
        keys = [m["key"] for b in loader for m in b.meta]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(keys))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_from_torch_distributed_with_dataloader_workers(tmp_path):
    import time

    import torch.multiprocessing as mp

    paths = [str(p) for p in _simple_shards(tmp_path, 12, 3)]
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path / "store"), paths, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method=start_method,
    )
    try:
        deadline = time.monotonic() + 120
        while not context.join(timeout=1.0):  # raises if a worker failed
            assert time.monotonic() < deadline, "distributed workers did not finish within 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    for rank in range(2):
        keys = json.loads((tmp_path / f"rank{rank}.json").read_text())
        explicit = WebDatasetPairs(paths, tokenizer=_token_len, epoch_samples=9, seed=7, rank=rank, world_size=2)
        loader = DataLoader(explicit, batch_size=4, num_workers=2, collate_fn=collate_samples)
        assert keys == [m["key"] for b in loader for m in b.meta]
        assert len(keys) == 9
    assert json.loads((tmp_path / "rank0.json").read_text()) != json.loads((tmp_path / "rank1.json").read_text())
