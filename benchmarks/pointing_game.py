"""The pointing game: does an explanation map of the demo model peak on the shape a text names?

    python benchmarks/pointing_game.py                      # trains configs/demo.yaml first (minutes on a CPU)
    python benchmarks/pointing_game.py --model runs/demo    # a trained model (saved or run directory)

On ``--n`` built-in two-shape images (``polymodal.datasets.shape_pointing_samples``, data seed ``--seed``,
which training never uses) each image is explained against the phrase naming one of its two shapes ("a
red circle"; the other shape differs in colour and in shape). A hit is a map whose maximum lies on the
named shape: on its pixels (``mask``), or inside its outline (``region``: a ring's hole too). Prints, per
method (Grad-CAM, attention rollout, gradient-weighted rollout), from one map per image and from the mean
over 2 x 2 copies shifted by half a patch (``explain(..., shifts=2)``), each also with the images explained
at 4/3 of their size (``upscale``), the hit rates next to the random
baseline (the mean share of the image the named shape covers: the hit rate of a uniformly random point),
and writes a PNG grid of the first images' overlays. The goal: 80% of hits on the shapes' pixels.

The settings (rollout from the first block; 2 x 2 shifts rather than 4 x 4, which scored the same at 4 times
the cost) were chosen on data seed 101, not on the images measured here.

Attention rollout gives the same map for every text, so on two-shape images it can point at the named
shape only about half the time whatever the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("gradcam", "rollout", "grad_rollout")
SHIFTS = (1, 2)
# explaining the images at 4/3 of their size (48 -> 64 pixels for the demo model), chosen on data seed 101
# against 56, 72, 80 and 96 pixels
UPSCALES = (1.0, 4 / 3)
GOAL = 0.80
GRID_IMAGES = 8


def trained_demo(out: Path) -> Path:
    from polymodal.train import train

    run_dir = out / "demo"
    start = time.perf_counter()
    train(ROOT / "configs" / "demo.yaml", [f"run_dir={run_dir}", "progress=false"])
    print(f"trained configs/demo.yaml in {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained model; default: train configs/demo.yaml")
    parser.add_argument("--n", type=int, default=500, help="images (default 500)")
    parser.add_argument("--seed", type=int, default=2024, help="data seed of the images (default 2024)")
    parser.add_argument("--grid", type=Path, default=Path("pointing_game.png"), help="the overlay grid PNG")
    args = parser.parse_args()
    print(describe_machine(), flush=True)

    from polymodal import from_pretrained, get_preprocess, get_tokenizer
    from polymodal.datasets import shape_pointing_samples
    from polymodal.tasks import explain, plot_explanation_grid, pointing_game, pointing_hits

    with tempfile.TemporaryDirectory() as tmp:
        model = from_pretrained(args.model if args.model is not None else trained_demo(Path(tmp))).eval()
    transform, tokenizer = get_preprocess(model, "image"), get_tokenizer(model)
    spec = model.config.input_spec("image")
    samples = shape_pointing_samples(args.n, args.seed, image_size=spec.image_size[0])
    images = torch.stack([transform(s.image) for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    regions = torch.from_numpy(np.stack([s.region for s in samples]))
    texts = [s.text for s in samples]

    start = time.perf_counter()
    results = {}
    settings = [(s, u) for u in UPSCALES for s in SHIFTS]
    for shifts, upscale in settings:
        for name, truth in (("pixels", masks), ("outline", regions)):
            scores = pointing_game(model, images, texts, truth, tokenizer, METHODS, shifts=shifts, upscale=upscale)
            results |= {(method, shifts, upscale, name): score for method, score in scores.items()}
    seconds = time.perf_counter() - start
    print(f"\npointing game on {args.n} two-shape images (data seed {args.seed}), {seconds:.1f} s")
    print(f"{'method':14}{'shifts':>7}{'upscale':>9}{'on pixels':>11}{'in outline':>12}")
    for method in METHODS:
        for shifts, upscale in settings:
            pixels, outline = (results[method, shifts, upscale, name] for name in ("pixels", "outline"))
            row = f"{method:14}{f'{shifts}x{shifts}':>7}{upscale:>9.2f}"
            print(f"{row}{pixels.accuracy:>11.1%}{outline.accuracy:>12.1%}")
    pixels, outline = (results[METHODS[0], 1, 1.0, name] for name in ("pixels", "outline"))
    print(f"{'random point':30}{pixels.baseline:>11.1%}{outline.baseline:>12.1%}")
    best = max(results[m, s, u, "pixels"].accuracy for m in METHODS for s, u in settings)
    print(f"goal: >= {GOAL:.0%} on the shapes' pixels: {'met' if best >= GOAL else 'NOT met'} (best {best:.1%})")

    maps, backgrounds, titles = [], [], []
    first = slice(0, GRID_IMAGES)
    for method in METHODS:
        found = explain(
            model, "image", images[first], texts[first], tokenizer, method, shifts=SHIFTS[-1], upscale=UPSCALES[-1]
        )
        hits = pointing_hits(found, masks[first]).tolist()
        maps += list(found)
        backgrounds += list(images[first])
        titles += [f"{method} {'hit' if hit else 'miss'}: {text}" for hit, text in zip(hits, texts[first])]
    path = plot_explanation_grid(maps, backgrounds, args.grid, titles, GRID_IMAGES, spec.mean, spec.std, overwrite=True)
    print(f"overlays: {path}")


if __name__ == "__main__":
    main()
