"""Training with ``model.lora``: only adapters change, with every task, accumulation, DDP, resume, and the run's
adapter directory merged from the command line."""

import subprocess
import sys

import pytest
import torch

import polymodal
from polymodal.encoders import read_state_dict
from polymodal.lora import RUN_ADAPTER_DIR, base_state_dict, lora_state_dict
from polymodal.train import TrainConfig, Trainer
from polymodal.train import checkpoints as ckpt
from tests.helpers import cli_fails
from tests.train.helpers import assert_same_weights, straight_and_resumed
from tests.train.test_distributed import run_training

LORA = {"towers": ["image", "text"], "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny CLIP (the micro clip-vit-tiny of the trainer tests) to adapt."""
    from tests.train.conftest import tiny_config

    torch.manual_seed(0)
    overrides = tiny_config(tmp_path_factory.mktemp("unused"))["model"]["overrides"]
    path = tmp_path_factory.mktemp("base") / "clip"
    polymodal.create_model("clip-vit-tiny", **overrides).save_pretrained(path)
    return str(path)


def lora_config(make_config, base_dir, **top):
    cfg = make_config(**{"eval_every": 0, **top})
    cfg["model"] = {"name": base_dir, "lora": dict(LORA)}
    cfg["data"]["eval_size"] = 16  # what is tested here is training; evaluation has its own tests
    return cfg


def newest_weights(run_dir) -> dict[str, torch.Tensor]:
    return read_state_dict(ckpt.complete_checkpoints(run_dir)[-1] / "model.safetensors")


def test_contrastive_run_trains_only_adapters_resumes_exactly_and_merges(make_config, base_dir, monkeypatch, tmp_path):
    cfg = lora_config(make_config, base_dir, steps=4)
    straight, resumed = straight_and_resumed(cfg, monkeypatch, kill_at=2)
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)

    base = polymodal.from_pretrained(base_dir).state_dict()
    trained = straight.model
    assert trained.config.lora.towers == ["image", "text"]
    for key, value in base_state_dict(trained).items():
        if key.startswith("towers."):
            assert torch.equal(value, base[key]), key  # the towers' own weights are bit-identical
    moved = [k for k, v in lora_state_dict(trained).items() if "lora_B" in k and v.abs().max() > 0]
    assert len(moved) == len([k for k in lora_state_dict(trained) if "lora_B" in k])  # every adapter learned

    # the run directory loads as the adapted model, and its adapter/ merges from the command line
    run_dir = straight.run_dir
    adapted = polymodal.from_pretrained(run_dir).eval()
    assert_same_weights(adapted, trained)
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "polymodal", "lora", "merge", str(run_dir / RUN_ADAPTER_DIR), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 10 LoRA adapters of the image, text tower(s)" in proc.stdout  # (4 in its block + proj) per tower
    merged = polymodal.from_pretrained(out).eval()
    assert merged.config.lora is None
    torch.manual_seed(3)
    image, text = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 32))
    with torch.no_grad():
        for modality, x in (("image", image), ("text", text)):
            torch.testing.assert_close(merged.encode(modality, x), adapted.encode(modality, x), rtol=0, atol=1e-5)


def test_accumulated_steps_equal_the_whole_batch(make_config, base_dir, tmp_path):
    runs = {}
    for accum in (1, 2):
        cfg = lora_config(make_config, base_dir, steps=2, run_dir=str(tmp_path / f"accum{accum}"))
        cfg["optim"]["accum_steps"] = accum
        trainer = Trainer(TrainConfig.from_dict(cfg))
        trainer.fit()
        runs[accum] = lora_state_dict(trainer.model)
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[2][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_classification_and_captioning_tasks_take_adapters(make_config, base_dir, tmp_path):
    classify = make_config(task="classify", steps=2, run_dir=str(tmp_path / "classify"), eval_every=0)
    classify["data"]["eval_size"] = 16
    classify["model"] = {"name": base_dir, "lora": {"towers": ["image"], "r": 2}}
    classify["task_args"] = {"mode": "finetune"}
    trainer = Trainer(TrainConfig.from_dict(classify))
    head = trainer.model.head.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(trainer.model.head.weight, head)  # the new head trains as usual
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("towers.")} == {n for n in trainable if ".lora_" in n} != set()

    caption = make_config(task="caption", steps=2, run_dir=str(tmp_path / "caption"), eval_every=0)
    caption["data"]["eval_size"] = 16
    caption["model"] = {
        "name": "coca-vit-tiny",
        "overrides": {"image": {"image_size": 32, "width": 32, "layers": 1, "heads": 2}},
        "lora": {"towers": ["image"], "r": 2},
    }
    caption["task_args"] = {"vocabulary": "data"}
    trainer = Trainer(TrainConfig.from_dict(caption))
    trainer.fit()
    assert polymodal.from_pretrained(tmp_path / "caption").config.lora.towers == ["image"]
    assert (tmp_path / "caption" / RUN_ADAPTER_DIR / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one_with_adapters(make_config, base_dir, tmp_path):
    results = {}
    for nproc in (1, 2):
        cfg = lora_config(make_config, base_dir, steps=2, run_dir=str(tmp_path / f"run{nproc}"), threads=1)
        run_training(cfg, tmp_path / f"cfg{nproc}.yaml", nproc)
        results[nproc] = newest_weights(tmp_path / f"run{nproc}")
    assert results[1].keys() == results[2].keys()
    assert any(".lora_A." in k for k in results[1])
    for k in results[1]:
        torch.testing.assert_close(results[2][k], results[1][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lora={towers: [image], targets: [nope]}", "lora.targets ['nope'] match no linear layer"),
        ("model.lora={towers: [image], r: 0}", "lora.r must be a positive integer"),
        ("model.lora={towers: [audio]}", "lora.towers names ['audio']"),
    ],
)
def test_bad_lora_recipes_exit_2(make_config, tmp_path, capsys, override, message):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(make_config(steps=1)))
    cli_fails(["train", str(path), override], capsys, message)
