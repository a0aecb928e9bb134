"""torchrun with 2 CPU processes (gloo) matches 1 process on the same global batch, step for step."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from polymodal import create_model
from polymodal.encoders import read_state_dict
from polymodal.train import checkpoints as ckpt


def run_training(cfg: dict, path, nproc: int) -> None:
    path.write_text(yaml.safe_dump(cfg))
    if nproc == 1:
        cmd = [sys.executable, "-m", "polymodal", "train", str(path)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "polymodal",
            "train",
            str(path),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_equal_one(make_config, tmp_path, loss):
    results = {}
    for nproc in (1, 2):
        cfg = make_config(
            steps=3,
            run_dir=str(tmp_path / f"run{nproc}"),
            threads=1,
            # the CLIP run takes the tiled loss (blocks of 5 on a global batch of 16), the SigLIP run the dense one
            optim={"loss": loss, "warmup_steps": 1, "loss_tile": 5 if loss == "clip" else None},
        )
        if loss == "siglip":
            cfg["model"]["overrides"]["init_logit_bias"] = -10.0
        run_training(cfg, tmp_path / f"cfg{nproc}.yaml", nproc)
        (last,) = ckpt.complete_checkpoints(tmp_path / f"run{nproc}")
        results[nproc] = read_state_dict(last / "model.safetensors")
    assert results[1].keys() == results[2].keys()
    for k in results[1]:
        torch.testing.assert_close(results[2][k], results[1][k], rtol=1e-5, atol=1e-6, msg=k)
    # and training really moved the weights away from their (seeded) initialisation
    torch.manual_seed(0)
    init = create_model("clip-vit-tiny", **cfg["model"]["overrides"]).state_dict()
    assert max((results[1][k] - init[k]).abs().max().item() for k in init) > 1e-4
