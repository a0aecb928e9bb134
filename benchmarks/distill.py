"""Distillation against training from scratch, on the built-in shapes data.

    python benchmarks/distill.py                          # seed 0; teacher runs/demo (trained first if absent)
    python benchmarks/distill.py --seeds 0 1 2 -- task_args.kd_temperature=0.1   # overrides after --

The teacher is the demo model (``configs/demo.yaml``; ``make demo`` writes ``runs/demo``, which is
reused when it holds a finished run, and trained otherwise). For each seed the student of
``configs/distill.yaml`` is trained twice with the same steps, data and seed (``seed=S data.seed=S``):
distilled from the teacher, and from scratch (``task=contrastive``, the same recipe without a teacher).
Each run is its own process, one after another, so no two share the CPU.

Prints a table of parameters, held-out zero-shot top-1 by shape and by colour (all images, and shape-colour
combinations never seen in training), text->image R@5 and training seconds (``train_seconds`` of
``report.json``), with min / median / max over seeds when there are several, and whether each seed meets
the goal: the distilled student beats the one from scratch (mean zero-shot top-1 over the two attributes)
and reaches at least 95% of the teacher's zero-shot top-1 on each attribute.
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
# (report key, column label)
METRICS = (
    ("zeroshot/shape/top1", "shape"),
    ("zeroshot/shape/unseen_top1", "shape uns."),
    ("zeroshot/colour/top1", "colour"),
    ("zeroshot/colour/unseen_top1", "colour uns."),
    ("retrieval/text_to_image/R@5", "t->i R@5"),
)
ATTRIBUTES = ("zeroshot/shape/top1", "zeroshot/colour/top1")
GOAL_SHARE = 0.95  # of the teacher's zero-shot top-1, per attribute


def train(config: Path, run_dir: Path, settings: list[str]) -> dict:
    """Run ``polymodal train`` in its own process; returns its report."""
    command = [sys.executable, "-m", "polymodal", "train", str(config), f"run_dir={run_dir}", "progress=false"]
    command += settings
    print(" ".join(command[1:]), flush=True)
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{run_dir.name} failed (exit {done.returncode}); see {log}")
    return json.loads((run_dir / "report.json").read_text())


def parameters(run_dir: Path) -> int:
    from polymodal import from_pretrained

    return sum(p.numel() for p in from_pretrained(run_dir).parameters())


def teacher_report(teacher: Path) -> dict:
    """The teacher's report: of the run in ``teacher`` when it finished, else of a demo run trained there now."""
    report = teacher / "report.json"
    if report.is_file():
        print(f"teacher: reusing {teacher}", flush=True)
        return json.loads(report.read_text())
    teacher.parent.mkdir(parents=True, exist_ok=True)
    return train(ROOT / "configs" / "demo.yaml", teacher, ["resume=latest"])


def row(label: str, params: int, ev: dict, seconds: float) -> str:
    cells = "".join(f"{100 * ev[key]:>12.1f}%" for key, _ in METRICS)
    return f"{label:22}{params / 1e6:>8.2f}M{cells}{seconds:>10.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "distill.yaml")
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the student runs here (default: a temporary folder)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of both student runs (after --)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)

    teacher = teacher_report(args.teacher)
    reports, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        # the from-scratch run takes the recipe without its teacher: no task_args at all
        scratch = [o for o in args.overrides if not o.startswith(("task_args", "task="))]
        for seed in args.seeds:
            common = [f"seed={seed}", f"data.seed={seed}"]
            runs = {
                "distilled": (out / f"distilled-{seed}", [f"task_args.teacher={args.teacher}", *args.overrides]),
                "scratch": (out / f"scratch-{seed}", [*scratch, "task=contrastive", "task_args={}"]),
            }
            for kind, (run_dir, settings) in runs.items():
                reports[kind, seed] = train(args.config, run_dir, [*common, *settings])
                params[kind] = parameters(run_dir)
        params["teacher"] = parameters(args.teacher)

    print(f"\n{args.config.name} {' '.join(args.overrides)}".rstrip())
    print(f"{'':22}{'params':>9}" + "".join(f"{label:>13}" for _, label in METRICS) + f"{'train s':>10}")
    print(row("teacher (demo)", params["teacher"], teacher["eval"], teacher["train_seconds"]))
    for seed in args.seeds:
        for kind in ("distilled", "scratch"):
            report = reports[kind, seed]
            print(row(f"{kind}, seed {seed}", params[kind], report["eval"], report["train_seconds"]))
    if len(args.seeds) > 1:
        for kind in ("distilled", "scratch"):
            for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
                ev = {key: pick(reports[kind, s]["eval"][key] for s in args.seeds) for key, _ in METRICS}
                seconds = pick(reports[kind, s]["train_seconds"] for s in args.seeds)
                print(row(f"{kind}, {name}", params[kind], ev, seconds))

    met = True
    print()
    for seed in args.seeds:
        distilled, scratch = (reports[kind, seed]["eval"] for kind in ("distilled", "scratch"))
        gain = statistics.mean(distilled[k] - scratch[k] for k in ATTRIBUTES)
        shares = {k.split("/")[1]: distilled[k] / teacher["eval"][k] for k in ATTRIBUTES}
        ok = gain > 0 and all(share >= GOAL_SHARE for share in shares.values())
        met &= ok
        print(
            f"seed {seed}: distilled - scratch {100 * gain:+.1f} points of zero-shot top-1; distilled / teacher "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items())
            + f"; goal {'met' if ok else 'NOT met'}"
        )
    print(f"students: {params['distilled'] / params['teacher']:.1%} of the teacher's parameters")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
