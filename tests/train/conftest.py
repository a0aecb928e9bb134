import pytest


def tiny_config(tmp_path, **top) -> dict:
    """A run small enough for a few seconds on CPU: micro clip-vit-tiny on 32x32 shapes."""
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "steps": 4,
        "seed": 0,
        "log_every": 1,
        "tensorboard": False,
        "progress": False,
        "model": {
            "name": "clip-vit-tiny",
            "overrides": {
                "image": {"image_size": 32, "width": 32, "layers": 1, "heads": 2},
                "text": {"width": 32, "layers": 1, "heads": 2},
            },
        },
        "data": {"source": "shapes", "train_size": 256, "eval_size": 64, "batch_size": 16, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
    }
    for key, value in top.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def make_config(tmp_path):
    return lambda **top: tiny_config(tmp_path, **top)
