"""The demo recipe across seeds: does every seed reach the targets, and how long does training take?

    python benchmarks/demo_seeds.py                       # configs/demo.yaml, seeds 0 1 2
    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 -- optim.lr=1e-3   # overrides after --

Each seed sets both ``seed`` and ``data.seed`` (``polymodal train configs/demo.yaml seed=S data.seed=S``)
and trains in its own process, one after another, so no two runs share the CPU. Prints, per seed and
as min / median / max: held-out zero-shot shape and colour top-1 (all images and unseen
combinations), text->image R@5 and the training time (``train_seconds`` of ``report.json``, which
leaves out building the model, data and the final evaluation), and whether each run met the targets
of the demo (shape and colour >= 90%, unseen >= 80%, text->image R@5 >= 90%, training <= 300 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
# (report key, label, target): a run passes when every value is >= its target (<= for seconds)
METRICS = (
    ("zeroshot/shape/top1", "shape", 0.90),
    ("zeroshot/shape/unseen_top1", "shape unseen", 0.80),
    ("zeroshot/colour/top1", "colour", 0.90),
    ("zeroshot/colour/unseen_top1", "colour unseen", 0.80),
    ("retrieval/text_to_image/R@5", "text->image R@5", 0.90),
)
MAX_TRAIN_SECONDS = 300.0


def run_seed(config: Path, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "polymodal", "train", str(config), f"seed={seed}", f"data.seed={seed}"]
    command += [f"run_dir={run_dir}", "progress=false", *overrides]
    print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"seed {seed} failed (exit {done.returncode}); see {log}")
    return json.loads((run_dir / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        reports = {s: run_seed(args.config, s, out / f"seed{s}", args.overrides) for s in args.seeds}

    print(f"\n{args.config.name} {' '.join(args.overrides)}".rstrip())
    header = f"{'':18}" + "".join(f"{f'seed {s}':>9}" for s in args.seeds) + f"{'min':>9}{'median':>9}{'max':>9}"
    print(header)
    passed = dict.fromkeys(args.seeds, True)
    for key, label, target in METRICS:
        values = [reports[s]["eval"][key] for s in args.seeds]
        for s, v in zip(args.seeds, values):
            passed[s] &= v >= target
        cells = "".join(f"{100 * v:>8.1f}%" for v in values)
        stats = (min(values), statistics.median(values), max(values))
        print(f"{label:18}{cells}" + "".join(f"{100 * v:>8.1f}%" for v in stats))
    seconds = [reports[s]["train_seconds"] for s in args.seeds]
    for s, v in zip(args.seeds, seconds):
        passed[s] &= v <= MAX_TRAIN_SECONDS
    stats = (min(seconds), statistics.median(seconds), max(seconds))
    print(f"{'train seconds':18}" + "".join(f"{v:>9.0f}" for v in seconds) + "".join(f"{v:>9.0f}" for v in stats))
    rates = [reports[s]["samples_per_s"] for s in args.seeds]
    print(f"{'samples/s':18}" + "".join(f"{v:>9.0f}" for v in rates))
    print(f"{'meets targets':18}" + "".join(f"{'yes' if passed[s] else 'NO':>9}" for s in args.seeds))
    sys.exit(0 if all(passed.values()) else 1)


if __name__ == "__main__":
    main()
