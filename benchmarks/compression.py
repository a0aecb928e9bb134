"""Compression, measured side by side in one run: int8 quantization and structured pruning.

    python benchmarks/compression.py                 # all parts; trains the demo model if runs/demo is absent
    python benchmarks/compression.py --parts speed   # speed, accuracy, prune: any of them

**speed**: images/s and texts/s of ``clip-vit-b-32`` (random weights: speed does not depend on them)
as fp32 eager PyTorch, fp32 ONNX Runtime, int8 dynamic and int8 static (``polymodal.quantize``),
each tower's size on disk, the ratios to fp32 eager and the embedding cosine to fp32. Batches run in
interleaved rounds (one batch of each variant per round), so a slower moment of the machine hits
every variant alike; the figure is the median over rounds.

**accuracy**: the demo model (``runs/demo``, ``make demo``) in the same four forms on its held-out
data: zero-shot top-1 by shape and colour, text->image R@5, and the cosine of every held-out
embedding to fp32 (minimum and mean); and its image tower's images/s.

**prune**: ``polymodal prune runs/demo --heads 0.5 --mlp 0.5 --calibration shapes``, then recovery
fine-tuning distilled from the unpruned model (``configs/prune-recover.yaml``, 100 steps) for each of
``--seeds``: parameters, image tower FLOPs per image, images/s (eager and under ONNX Runtime, each
interleaved with the original) and held-out zero-shot accuracy before pruning, after it and after
recovery (min / median / max over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe_machine

from polymodal import create_model, from_pretrained, get_preprocess, get_tokenizer
from polymodal.deploy import DeployedModel, export_towers
from polymodal.quantize import quantize_towers

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    ("zeroshot/shape/top1", "shape top-1"),
    ("zeroshot/shape/unseen_top1", "shape unseen"),
    ("zeroshot/colour/top1", "colour top-1"),
    ("retrieval/text_to_image/R@5", "text->image R@5"),
)


def interleaved_rates(runs: dict[str, Callable[[], object]], batch: int, rounds: int) -> dict[str, float]:
    """Samples/s of each callable (one batch per call): one warm-up each, then ``rounds`` rounds of one
    call each, the median time per variant."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def folder_bytes(folder: Path, modality: str) -> int:
    manifest = json.loads((folder / "deployment.json").read_text())
    return (folder / manifest["towers"][modality]).stat().st_size


def tower_bytes(model, modality: str) -> int:
    return sum(t.numel() * t.element_size() for t in model.towers[modality].state_dict().values())


def four_forms(model, work: Path, calibration: list[dict]) -> dict[str, object]:
    """fp32 eager, and ONNX fp32 / int8 dynamic / int8 static folders of ``model``, loaded."""
    forms: dict[str, object] = {"fp32 eager": model}
    forms["fp32 ORT"] = DeployedModel.load(export_towers(model, work / "fp32", "onnx"))
    forms["int8 dynamic"] = DeployedModel.load(quantize_towers(model, work / "dynamic", "dynamic"))
    forms["int8 static"] = DeployedModel.load(quantize_towers(model, work / "static", "static", calibration))
    return forms


def shapes_batches(model, split: str, n: int, batch_size: int, image_size: int | None = None) -> list[dict]:
    from torch.utils.data import DataLoader

    from polymodal.datasets import ShapesDataset, collate_samples

    spec = model.config.input_spec("image")
    data = ShapesDataset(
        split,
        n,
        0,
        image_size=image_size or spec.image_size[0],
        transform=get_preprocess(model, "image"),
        tokenizer=get_tokenizer(model),
    )
    return [b.inputs for b in DataLoader(data, batch_size=batch_size, collate_fn=collate_samples)]


def cut_to_used_length(ids: torch.Tensor) -> torch.Tensor:
    """Token ids cut after the batch's last end-of-text token (the highest id): what every variant is fed,
    so that none runs padding the others do not (eager polymodal cuts it itself; ONNX runs what it gets)."""
    return ids[:, : int(ids.argmax(dim=1).max()) + 1]


def part_speed(work: Path, rounds: int) -> None:
    print("\n== speed: clip-vit-b-32 (random weights), batch 32 ==", flush=True)
    torch.manual_seed(0)
    model = create_model("clip-vit-b-32").eval()
    calibration = shapes_batches(model, "train", 128, 32, image_size=224)
    forms = four_forms(model, work / "b32", calibration)
    held = shapes_batches(model, "heldout", 32, 32, image_size=224)[0]
    images, ids = held["image"], cut_to_used_length(held["text"])
    print(f"texts of {ids.shape[1]} tokens (the batch's longest caption)")
    with torch.inference_mode():
        results = {}
        for modality, x in (("image", images), ("text", ids)):
            runs = {name: (lambda f=f, x=x, m=modality: f.encode(m, x)) for name, f in forms.items()}
            rates = interleaved_rates(runs, len(x), rounds)
            ref = torch.nn.functional.normalize(model.encode(modality, x), dim=-1)
            cos = {
                n: float((torch.nn.functional.normalize(f.encode(modality, x), dim=-1) * ref).sum(-1).min())
                for n, f in forms.items()
            }
            sizes = {"fp32 eager": tower_bytes(model, modality)}
            sizes.update({n: folder_bytes(f.directory, modality) for n, f in forms.items() if n != "fp32 eager"})
            results[modality] = (rates, cos, sizes)
    columns = ("images/s", "ratio", "texts/s", "ratio", "image MB", "text MB", "min cos img", "min cos txt")
    print(f"{'':14}" + "".join(f"{c:>12}" for c in columns))
    base_i, base_t = results["image"][0]["fp32 eager"], results["text"][0]["fp32 eager"]
    for name in forms:
        (ri, ci, si), (rt, ct, st) = results["image"], results["text"]
        cells = (f"{ri[name]:.1f}", f"{ri[name] / base_i:.2f}x", f"{rt[name]:.1f}", f"{rt[name] / base_t:.2f}x")
        cells += (f"{si[name] / 2**20:.1f}", f"{st[name] / 2**20:.1f}", f"{ci[name]:.5f}", f"{ct[name]:.5f}")
        print(f"{name:14}" + "".join(f"{c:>12}" for c in cells))


def heldout(run_dir: Path, model):
    """The demo run's held-out batches and zero-shot prompts, as the trainer evaluated them."""
    from torch.utils.data import DataLoader

    from polymodal.datasets import collate_samples
    from polymodal.train import build_datasets, load_config

    cfg = load_config(run_dir / "config.yaml").data
    data = build_datasets(
        cfg, model.config, get_tokenizer(model), None, get_preprocess(model, "image"), with_train=False
    )
    return list(DataLoader(data.eval, batch_size=250, collate_fn=collate_samples)), data


def evaluate(model, batches, data) -> tuple[dict[str, float], dict]:
    from polymodal.tasks import evaluate_contrastive

    with torch.inference_mode():
        metrics, embedded = evaluate_contrastive(
            model, get_tokenizer(model.config), batches, data.zero_shot, data.unseen_key, modality="image"
        )
    return metrics, embedded.embeddings


def part_accuracy(demo: Path, work: Path, rounds: int) -> None:
    print(f"\n== accuracy: the demo model ({demo}) on its held-out data ==", flush=True)
    model = from_pretrained(demo).eval()
    calibration = shapes_batches(model, "train", 256, 64)
    forms = four_forms(model, work / "demo", calibration)
    batches, data = heldout(demo, model)
    results = {name: evaluate(f, batches, data) for name, f in forms.items()}
    images = batches[0].inputs["image"]
    with torch.inference_mode():
        runs = {name: (lambda f=f: f.encode("image", images)) for name, f in forms.items()}
        rates = interleaved_rates(runs, len(images), rounds)
    ref_metrics, ref_emb = results["fp32 eager"]
    print(
        f"{'':14}"
        + "".join(f"{label:>17}" for _, label in KEYS)
        + f"{'cos img min/mean':>19}{'cos txt min/mean':>19}{'images/s':>10}"
    )
    for name, (metrics, emb) in results.items():
        cells = "".join(f"{100 * metrics[k]:>16.1f}%" for k, _ in KEYS)
        cos = {m: (emb[m] * ref_emb[m]).sum(-1) for m in ("image", "text")}
        cells += "".join(f"{float(c.min()):>11.4f}/{float(c.mean()):.4f}" for c in cos.values())
        print(f"{name:14}{cells}{rates[name]:>10.1f}")
    worst = max(100 * (ref_metrics[k] - results[n][0][k]) for n in results for k, _ in KEYS[:1] + KEYS[2:3])
    print(f"largest zero-shot top-1 loss against fp32: {worst:.1f} points")


def flops_per_image(model) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *model.config.input_spec("image").image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(x)
    return counter.get_total_flops()


def part_prune(demo: Path, work: Path, rounds: int, seeds: list[int], steps: int) -> None:
    print(f"\n== prune: the demo model ({demo}), heads 0.5, MLP 0.5, then {steps} recovery steps ==", flush=True)
    pruned_dir = work / "pruned"
    command = [sys.executable, "-m", "polymodal", "prune", str(demo), "--heads", "0.5", "--mlp", "0.5"]
    command += ["--calibration", "shapes", "--calibration-size", "512", "--out", str(pruned_dir)]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    original, pruned = from_pretrained(demo).eval(), from_pretrained(pruned_dir).eval()
    batches, data = heldout(demo, original)
    rows = {"original": evaluate(original, batches, data)[0], "pruned": evaluate(pruned, batches, data)[0]}
    recovered = []
    for seed in seeds:
        run_dir = work / f"recover-seed{seed}"
        cmd = [sys.executable, "-m", "polymodal", "train", str(ROOT / "configs" / "prune-recover.yaml")]
        cmd += [
            f"model.name={pruned_dir}",
            f"task_args.teacher={demo}",
            f"run_dir={run_dir}",
            f"seed={seed}",
            f"data.seed={seed}",
        ]
        cmd += [f"steps={steps}", "progress=false"]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        recovered.append(evaluate(from_pretrained(run_dir).eval(), batches, data)[0])
    images = batches[0].inputs["image"]
    onnx = {
        k: DeployedModel.load(export_towers(m, work / f"{k}-onnx", "onnx", towers=["image"]))
        for k, m in (("original", original), ("pruned", pruned))
    }
    with torch.inference_mode():
        runs = {"original": lambda: original.encode_image(images), "pruned": lambda: pruned.encode_image(images)}
        runs.update({f"{k} ORT": (lambda d=d: d.encode_image(images)) for k, d in onnx.items()})
        rates = interleaved_rates(runs, len(images), rounds)
    params = {
        "original": sum(p.numel() for p in original.parameters()),
        "pruned": sum(p.numel() for p in pruned.parameters()),
    }
    image_params = {
        k: sum(p.numel() for p in m.towers["image"].parameters())
        for k, m in (("original", original), ("pruned", pruned))
    }
    flops = {"original": flops_per_image(original), "pruned": flops_per_image(pruned)}
    columns = ("params", "image params", "image GFLOP", "images/s", *(label for _, label in KEYS))

    def row(label: str, name: str, metrics: dict[str, float]) -> None:
        cells = (f"{params[name]:,}", f"{image_params[name]:,}", f"{flops[name] / 1e9:.4f}", f"{rates[name]:.1f}")
        cells += tuple(f"{100 * metrics[k]:.1f}%" for k, _ in KEYS)
        print(f"{label:26}" + "".join(f"{c:>16}" for c in cells))

    print(f"{'':26}" + "".join(f"{c:>16}" for c in columns))
    for name in ("original", "pruned"):
        row(name, name, rows[name])
    for stat, fn in (("min", min), ("median", statistics.median), ("max", max)):
        row(f"recovered ({stat}, {len(seeds)} seeds)", "pruned", {k: fn(r[k] for r in recovered) for k, _ in KEYS})
    speedup, fewer = rates["pruned"] / rates["original"], flops["original"] / flops["pruned"]
    ort = rates["pruned ORT"] / rates["original ORT"]
    print(f"image tower speed-up: {speedup:.2f}x eager, {ort:.2f}x under ONNX Runtime; FLOPs {fewer:.2f}x fewer")
    print(f"images/s under ONNX Runtime: original {rates['original ORT']:.1f}, pruned {rates['pruned ORT']:.1f}")
    for key, label in KEYS[:1] + KEYS[2:3]:
        share = [r[key] / rows["original"][key] for r in recovered]
        low, mid, high = min(share), statistics.median(share), max(share)
        print(f"{label} after recovery, share of the original's: min {low:.1%}, median {mid:.1%}, max {high:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=("speed", "accuracy", "prune"), default=["speed", "accuracy", "prune"]
    )
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo", help="the demo run (trained if absent)")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds per variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recovery seeds")
    parser.add_argument("--steps", type=int, default=100, help="recovery fine-tuning steps")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    if {"accuracy", "prune"} & set(args.parts) and not (args.demo / "report.json").is_file():
        print(f"{args.demo} holds no finished run: training it with configs/demo.yaml", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "polymodal",
            "train",
            str(ROOT / "configs" / "demo.yaml"),
            f"run_dir={args.demo}",
            "progress=false",
        ]
        subprocess.run(cmd, check=True)
    with tempfile.TemporaryDirectory(prefix="compression-") as tmp:
        work = Path(tmp)
        if "speed" in args.parts:
            part_speed(work, args.rounds)
        if "accuracy" in args.parts:
            part_accuracy(args.demo, work, args.rounds)
        if "prune" in args.parts:
            part_prune(args.demo, work, args.rounds, args.seeds, args.steps)


if __name__ == "__main__":
    main()
