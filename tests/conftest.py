import os

import pytest
import torch

# Tests run on 2 CPU cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_shapes_run(tmp_path_factory):
    """A clip-vit-tiny trained briefly on the built-in shapes (about 30 s on 2 cores), shared by the task
    tests: enough to tell colours apart reliably (and shapes somewhat). ``from_pretrained`` takes the
    returned run directory."""
    from polymodal.train import train

    run_dir = tmp_path_factory.mktemp("shapes_run") / "run"
    train(
        {
            "run_dir": str(run_dir),
            "steps": 120,
            "seed": 0,
            "log_every": 40,
            "tensorboard": False,
            "progress": False,
            "model": {"name": "clip-vit-tiny"},
            "data": {"source": "shapes", "train_size": 20000, "eval_size": 200, "batch_size": 64, "num_workers": 0},
            "optim": {"lr": 2e-3, "warmup_steps": 10},
        }
    )
    return run_dir
