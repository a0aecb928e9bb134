"""Word order and relations: can a contrastive model tell a caption from its swapped version?

    python benchmarks/relations.py                       # configs/relations.yaml, seeds 0 1 2, three losses
    python benchmarks/relations.py --seeds 0 --modes plain hard-negatives -- steps=400   # overrides after --

Half of the built-in shapes images hold two shapes in a stated relation (``data.builtin.relation_share:
0.5``): "a red circle to the left of a blue star", "... above ...", "... bigger than ...". For each held-out
relation image the evaluation asks which of two captions is closer to the image: its own, or the same
words with the two shapes swapped ("a blue star to the left of a red circle"), or with their colours
exchanged. Half of the held-out relation images pair shapes that never appear together in training
(``UNSEEN_PAIRS``). A tie counts as wrong: a bag-of-words model scores 0.5 at best.

Three losses train at equal steps, each with every seed in its own process, one after another (no two
share the CPU):

- ``plain``: CLIP's InfoNCE, one positive per image;
- ``multi-positive``: ``data.group_by=caption``, duplicate captions in a batch are positives of each other;
- ``hard-negatives``: ``data.hard_negatives=3``, the swapped, colour-exchanged and opposite-relation
  captions added to the text side of the loss (NegCLIP-style).

Prints, per loss and seed and as min / median / max: swap accuracy (all, seen and unseen shape pairs, and
by layout: left / right, above / below, bigger / smaller), colour-exchange accuracy, single-attribute
zero-shot top-1 (shape, colour) on the one-shape images, and text->image R@5; then whether hard
negatives met the goal: swap accuracy >= 90% on every seed, with
zero-shot shape and colour top-1 no lower than the plain loss's median minus 2 points.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from demo_seeds import run_seed
from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "plain": ["data.hard_negatives=0"],
    "multi-positive": ["data.hard_negatives=0", "data.group_by=caption"],
    "hard-negatives": ["data.hard_negatives=3"],
}
METRICS = (
    ("choice/swap/top1", "swap"),
    ("choice/swap/seen_top1", "swap, seen pairs"),
    ("choice/swap/unseen_top1", "swap, unseen pairs"),
    ("choice/swap/horizontal_top1", "swap, left / right"),
    ("choice/swap/vertical_top1", "swap, above / below"),
    ("choice/swap/size_top1", "swap, bigger / smaller"),
    ("choice/colours/top1", "colour exchange"),
    ("zeroshot/shape/top1", "zero-shot shape"),
    ("zeroshot/colour/top1", "zero-shot colour"),
    ("retrieval/text_to_image/R@5", "text->image R@5"),
)
SWAP_GOAL = 0.90
ZEROSHOT_SLACK = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "relations.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)

    evals: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for mode in args.modes:
            overrides = MODES[mode] + args.overrides
            evals[mode] = {s: run_seed(args.config, s, out / f"{mode}-seed{s}", overrides)["eval"] for s in args.seeds}

    print(f"\n{args.config.name} {' '.join(args.overrides)}".rstrip())
    header = f"{'':34}" + "".join(f"{f'seed {s}':>9}" for s in args.seeds) + f"{'min':>9}{'median':>9}{'max':>9}"
    for key, label in METRICS:
        print(f"\n{label}\n{header}")
        for mode in args.modes:
            values = [evals[mode][s].get(key, float("nan")) for s in args.seeds]
            stats = (min(values), statistics.median(values), max(values))
            print(f"  {mode:32}" + "".join(f"{100 * v:>8.1f}%" for v in (*values, *stats)))

    if "hard-negatives" not in evals:
        return
    hard = evals["hard-negatives"]
    ok = all(hard[s]["choice/swap/top1"] >= SWAP_GOAL for s in args.seeds)
    verdict = f"\nhard negatives: swap >= {100 * SWAP_GOAL:.0f}% on every seed: {'yes' if ok else 'NO'}"
    if "plain" in evals:
        for key in ("zeroshot/shape/top1", "zeroshot/colour/top1"):
            floor = statistics.median(evals["plain"][s][key] for s in args.seeds) - ZEROSHOT_SLACK
            kept = all(hard[s][key] >= floor for s in args.seeds)
            ok &= kept
            verdict += f"; {key} >= plain median - {100 * ZEROSHOT_SLACK:.0f} points: {'yes' if kept else 'NO'}"
    print(verdict)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
