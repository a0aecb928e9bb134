"""Training steps/s in fp32 against bf16 autocast (``precision: bf16``), measured side by side in one run.

    python benchmarks/precision.py                                   # clip-vit-tiny (the demo) and clip-vit-b-32
    python benchmarks/precision.py --models clip-vit-tiny --rounds 10 --batch-size 64

For each model, one trainer per precision is built from the same recipe on the built-in shapes data and
starts from the same weights. Both then train on the same batches in interleaved rounds (one optimiser
step of each precision per round, the order swapped every round), so a slower moment of the machine hits
both alike; the figure is the median samples/s over the rounds after ``--warmup`` untimed ones. Also
printed: the loss of each after the last round, to show bf16 trains the same recipe.

bf16 pays off only where the CPU has bf16 matrix units (AVX-512 BF16, AMX): the first line printed names
the CPU's flags. On a CPU without them oneDNN emulates bf16, and fp32 is usually faster.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from machine import describe_machine

from polymodal.train import TrainConfig, Trainer

# model -> default batch: the demo model at the demo's batch, ViT-B/32 (224 px) at one that keeps steps short
MODELS = {"clip-vit-tiny": 128, "clip-vit-b-32": 16}


def make_trainer(model: str, precision: str, batch: int, image_size: int | None, run_dir: Path) -> Trainer:
    overrides = {"image": {"image_size": image_size}} if image_size else {}
    cfg = {
        "run_dir": str(run_dir),
        "steps": 10**6,
        "seed": 0,
        "tensorboard": False,
        "progress": False,
        "precision": precision,
        "model": {"name": model, "overrides": overrides},
        "data": {"source": "shapes", "train_size": 4096, "eval_size": 64, "batch_size": batch, "num_workers": 0},
        "optim": {"lr": 1e-4, "warmup_steps": 1},
    }
    return Trainer(TrainConfig.from_dict(cfg))


def measure(model: str, batch: int, image_size: int | None, rounds: int, warmup: int, work: Path) -> None:
    trainers = {p: make_trainer(model, p, batch, image_size, work / f"{model}-{p}") for p in ("fp32", "bf16")}
    start = copy.deepcopy(trainers["fp32"].model.state_dict())
    trainers["bf16"].model.load_state_dict(start)
    batches = trainers["fp32"]._batches()
    rates: dict[str, list[float]] = {p: [] for p in trainers}
    losses: dict[str, float] = {}
    for r in range(warmup + rounds):
        batch_r = next(batches)
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        for p in order:
            t0 = time.perf_counter()
            loss, _, _ = trainers[p].train_step(batch_r)
            seconds = time.perf_counter() - t0
            losses[p] = float(loss)
            if r >= warmup:
                rates[p].append(len(batch_r) / seconds)
    fp32, bf16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
    size = f", images {image_size}px" if image_size else ""
    print(f"\n{model} (batch {batch}{size}; median of {rounds} rounds after {warmup} warm-up)")
    print(f"{'precision':<10}{'samples/s':>11}{'x fp32':>8}{'loss after':>12}")
    print(f"{'fp32':<10}{fp32:>11.1f}{1.0:>8.2f}{losses['fp32']:>12.4f}")
    print(f"{'bf16':<10}{bf16:>11.1f}{bf16 / fp32:>8.2f}{losses['bf16']:>12.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model (see MODELS)")
    parser.add_argument("--image-size", type=int, default=None, help="override the image size (default: the model's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for model in args.models:
            batch = args.batch_size or MODELS[model]
            measure(model, batch, args.image_size, args.rounds, args.warmup, Path(tmp))


if __name__ == "__main__":
    main()
