"""Training steps/s in fp32 against bf16 autocast (``precision: bf16``), and against ``model.compile: true``
with ``--compile``, measured side by side in one run.

    python benchmarks/precision.py                                   # clip-vit-tiny (the demo) and clip-vit-b-32
    python benchmarks/precision.py --models clip-vit-tiny --rounds 10 --batch-size 64
    python benchmarks/precision.py --models clip-vit-tiny --compile  # also fp32 through torch.compile (inductor)

For each model, one trainer per variant (precision, compiled or not) is built from the same recipe on the
built-in shapes data and starts from the same weights. All then train on the same batches in interleaved
rounds (one optimiser step of each variant per round, the order reversed every round), so a slower moment
of the machine hits all alike; the figure is the median samples/s over the rounds after ``--warmup`` untimed ones (the
compiled trainer compiles during the warm-up). Also
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


# variant -> (precision, model.compile)
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+compile": ("fp32", True)}


def make_trainer(
    model: str, precision: str, batch: int, image_size: int | None, run_dir: Path, compiled: bool = False
) -> Trainer:
    overrides = {"image": {"image_size": image_size}} if image_size else {}
    cfg = {
        "run_dir": str(run_dir),
        "steps": 10**6,
        "seed": 0,
        "tensorboard": False,
        "progress": False,
        "precision": precision,
        "model": {"name": model, "overrides": overrides, "compile": compiled},
        "data": {"source": "shapes", "train_size": 4096, "eval_size": 64, "batch_size": batch, "num_workers": 0},
        "optim": {"lr": 1e-4, "warmup_steps": 1},
    }
    return Trainer(TrainConfig.from_dict(cfg))


def measure(
    model: str, batch: int, image_size: int | None, rounds: int, warmup: int, work: Path, variants: list[str]
) -> None:
    trainers = {
        v: make_trainer(model, VARIANTS[v][0], batch, image_size, work / f"{model}-{v}", VARIANTS[v][1])
        for v in variants
    }
    start = copy.deepcopy(trainers["fp32"].model.state_dict())
    for v in variants[1:]:
        trainers[v].model.load_state_dict(start)
    batches = trainers["fp32"]._batches()
    rates: dict[str, list[float]] = {p: [] for p in trainers}
    losses: dict[str, float] = {}
    for r in range(warmup + rounds):
        batch_r = next(batches)
        order = variants if r % 2 == 0 else variants[::-1]
        for p in order:
            t0 = time.perf_counter()
            loss, _, _ = trainers[p].train_step(batch_r)
            seconds = time.perf_counter() - t0
            losses[p] = float(loss)
            if r >= warmup:
                rates[p].append(len(batch_r) / seconds)
    median = {v: statistics.median(rates[v]) for v in variants}
    size = f", images {image_size}px" if image_size else ""
    print(f"\n{model} (batch {batch}{size}; median of {rounds} rounds after {warmup} warm-up)")
    print(f"{'variant':<14}{'samples/s':>11}{'x fp32':>8}{'loss after':>12}")
    for v in variants:
        print(f"{v:<14}{median[v]:>11.1f}{median[v] / median['fp32']:>8.2f}{losses[v]:>12.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model (see MODELS)")
    parser.add_argument("--image-size", type=int, default=None, help="override the image size (default: the model's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also train fp32 through torch.compile")
    args = parser.parse_args()
    variants = ["fp32", "bf16", *(["fp32+compile"] if args.compile else [])]
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for model in args.models:
            batch = args.batch_size or MODELS[model]
            measure(model, batch, args.image_size, args.rounds, args.warmup, Path(tmp), variants)


if __name__ == "__main__":
    main()
