import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

# Tests run on 2 CPU cores; more threads than cores only adds contention. Under pytest-xdist (make test runs
# `-n 2`) each worker gets its share of the cores, and so do the processes a test starts (torchrun, the CLI,
# notebook kernels), through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The files that take longest (a minute or more each on 2 cores, from `make test --durations`), started first:
# `--dist loadfile` hands whole files to whichever worker is free in collection order, so a long file collected
# last (the notebooks are) leaves the other worker idle at the end. Longest first evens the two out.
LONGEST_FIRST = (
    "tests/test_notebooks.py",
    "tests/test_notebook_adapt.py",
    "tests/tasks/test_captioning.py",
    "tests/train/test_compile.py",
    "tests/train/test_distributed.py",
    "tests/train/test_fsdp.py",
    "tests/train/test_lora_training.py",
    "tests/core/test_quantize.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))

    def order(indexed):
        index, item = indexed
        path = Path(str(item.path)).relative_to(root).as_posix()
        return (rank.get(path, len(rank)), index)  # stable: the rest keep their collection order

    items[:] = [item for _, item in sorted(enumerate(items), key=order)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_shapes_run(tmp_path_factory):
    """A clip-vit-tiny trained briefly on the built-in shapes (about 30 s on 2 cores), shared by the task
    tests: enough to tell colours apart reliably (and shapes somewhat). ``from_pretrained`` takes the
    returned run directory."""
    from polymodal.train import train

    # One run for the whole session, also across xdist workers: they share the base temp folder's parent,
    # and the first to take the lock trains while the others wait for it (pytest-xdist's documented recipe).
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    run_dir = Path(root) / "shapes_run" / "run"
    with FileLock(str(run_dir.parent) + ".lock"):
        if not (run_dir / "report.json").is_file():
            _train_shapes(train, run_dir)
    return run_dir


def _train_shapes(train, run_dir: Path) -> None:
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
