"""FSDP2 (``distributed.strategy: fsdp``) under torchrun with 2 CPU processes (gloo): the same weights as one
process, whole checkpoints that a single process loads, and an exact resume."""

import shutil

import pytest
import torch

import polymodal
from polymodal.encoders import read_state_dict
from polymodal.train import checkpoints as ckpt
from polymodal.train import sharding
from tests.helpers import cli_fails
from tests.train.test_distributed import run_training


def last_checkpoint(run_dir):
    return ckpt.complete_checkpoints(run_dir)[-1]


def assert_close_states(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tolerance)


def test_every_block_of_every_tower_is_sharded_on_its_own():
    model = polymodal.create_model("clip-vit-tiny")
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(b)] for b in sharding.shard_blocks(model)]
    image, text = (len(model.towers[t].transformer.blocks) for t in ("image", "text"))
    assert blocks == [f"towers.image.transformer.blocks.{i}" for i in range(image)] + [
        f"towers.text.transformer.blocks.{i}" for i in range(text)
    ]
    # the learned temperature is a scalar, which FSDP2 cannot shard: it stays whole on every rank
    assert [p is model.alignment.logit_scale for p in sharding.replicated_parameters(model)] == [True]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_sharded_processes_equal_one_and_write_whole_checkpoints(make_config, tmp_path):
    # with an EMA, so its sharded copy is gathered too, and GradCache accumulation (2 micro-batches a step);
    # the 1-process run is plain (no torch.distributed)
    runs = {}
    for nproc, strategy in ((1, "ddp"), (2, "fsdp")):
        cfg = make_config(
            steps=3,
            run_dir=str(tmp_path / strategy),
            threads=1,
            distributed={"strategy": strategy},
            optim={"warmup_steps": 1, "ema_decay": 0.5, "accum_steps": 2},
        )
        run_training(cfg, tmp_path / f"{strategy}.yaml", nproc)
        runs[strategy] = last_checkpoint(tmp_path / strategy)
    for name in ("model.safetensors", ckpt.EMA_NAME):
        whole, sharded = (read_state_dict(runs[s] / name) for s in ("ddp", "fsdp"))
        assert_close_states(sharded, whole, rtol=1e-5, atol=5e-6)
    # the optimiser state too, laid out as a single process's (so either strategy resumes the other's runs)
    states = {s: torch.load(runs[s] / ckpt.STATE_NAME, weights_only=True)["optimizer"] for s in runs}
    assert states["fsdp"]["state"].keys() == states["ddp"]["state"].keys()
    for i, moments in states["ddp"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states["fsdp"]["state"][i][key], moments[key], rtol=1e-5, atol=1e-7)
    # a single process loads the sharded run's checkpoint as any model, with exactly its weights
    loaded = polymodal.from_pretrained(runs["fsdp"]).state_dict()
    saved = read_state_dict(runs["fsdp"] / "model.safetensors")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sharded_run_resumes_exactly(make_config, tmp_path):
    cfg = make_config(
        steps=4, save_every=2, run_dir=str(tmp_path / "straight"), threads=1, distributed={"strategy": "fsdp"}
    )
    run_training(cfg, tmp_path / "straight.yaml", 2)
    # the same run stopped after its step-2 checkpoint: resumed, under fsdp and in a single process
    for name, nproc, strategy in (("fsdp", 2, "fsdp"), ("single", 1, "ddp")):
        shutil.copytree(tmp_path / "straight", tmp_path / name)
        shutil.rmtree(ckpt.checkpoint_dir(tmp_path / name, 4))
        resumed = {**cfg, "run_dir": str(tmp_path / name), "resume": "latest", "distributed": {"strategy": strategy}}
        run_training(resumed, tmp_path / f"{name}.yaml", nproc)
    straight = read_state_dict(ckpt.checkpoint_dir(tmp_path / "straight", 4) / "model.safetensors")
    again = read_state_dict(ckpt.checkpoint_dir(tmp_path / "fsdp", 4) / "model.safetensors")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)  # bit for bit
    # one process computes the same steps without the shards' reductions: equal within float32 rounding
    single = read_state_dict(ckpt.checkpoint_dir(tmp_path / "single", 4) / "model.safetensors")
    assert_close_states(single, straight, rtol=1e-5, atol=5e-6)
    # and the resumed steps did train: step 4 differs from step 2
    step2 = read_state_dict(ckpt.checkpoint_dir(tmp_path / "straight", 2) / "model.safetensors")
    assert max((straight[k] - step2[k]).abs().max().item() for k in straight) > 1e-5


def test_fsdp_without_torchrun_is_refused(make_config, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(make_config(distributed={"strategy": "fsdp"})))
    cli_fails(["train", str(path)], capsys, "distributed.strategy fsdp needs torchrun with 2 or more processes")
    assert not (tmp_path / "run").exists()  # refused before anything was written
