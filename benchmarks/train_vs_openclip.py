"""Training throughput and held-out quality of clip-vit-tiny: polymodal's trainer against open_clip's own.

The built-in ``shapes`` data is written once as files, in each layout ``--inputs`` names (a train split of
``--train-size`` images, plus one held-out split):

- ``csv-png``: PNG files with an ``index.csv`` (and a TSV of the same rows with absolute paths for
  open_clip's csv loader);
- ``csv-jpg``: the same as JPEG files (quality 95, as img2dataset writes them);
- ``wds-jpg``: WebDataset shards of JPEG + caption, read by open_clip's ``--dataset-type webdataset``
  and by polymodal's ``data.source: wds``.

For each layout the same architecture is trained on those same files by ``open_clip_train.main``
(with the architecture registered through ``open_clip.add_model_config``) and by ``polymodal train``,
each in its own subprocess, one after the other, so the two never compete for cores. Image decoding
runs in each trainer's DataLoader workers and is part of the time. Both get the same
recipe: batch size, number of samples (steps x batch = epochs x (train size // batch)), AdamW betas/eps,
peak lr, linear warm-up then cosine decay to 0, weight decay, gradient clipping, fp32, the same random
resized crop augmentation, data workers, torch threads and log interval.

What is timed (both include each epoch's DataLoader start-up and every per-step overhead of the trainer;
both exclude interpreter and library start-up, model building, data indexing, checkpoint saving and
evaluation):

- polymodal: ``train_seconds`` from its ``report.json``, measured by the trainer from just before the
  first batch is requested to the end of the last optimiser step; samples/s = steps x batch / that.
- open_clip: every call of ``open_clip_train.train.train_one_epoch``, timed by a wrapper the launcher puts
  around it; samples/s = epochs x batches x batch / the summed time.

Also printed, as a check that is robust to a burst of load from other processes: the median over log windows
(``--log-every`` steps) of each trainer's own throughput figure: polymodal's ``samples_per_s`` rows in
``metrics.jsonl``, open_clip's ``Batch (t)`` (mean step time over the window) as batch / time.

With ``--rounds`` above 1 the pair is trained again with the order swapped each round and the median
samples/s is reported; quality comes from the first round's models. A summary table at the end gives
one row per layout.

Both final models are then evaluated by the same polymodal code (``polymodal.train.evaluate.evaluate``)
on the held-out split: zero-shot shape and colour top-1 with the built-in prompts, and retrieval recall.
open_clip's checkpoint goes through polymodal's own importer (``resolve_model(..., pretrained=epoch_E.pt)``),
checked against open_clip's model on the same weights first.

Differences that remain: initial weights (each library's own init, same seed), data order, and weight
decay groups (open_clip decays the positional and token embeddings, polymodal does not). From shards,
open_clip reads each shard once per epoch (``--train-num-samples`` = the train size) and polymodal
resamples shards (``data.epoch_samples`` = the train size): both shuffle within a buffer.
open_clip's csv loader needs pandas, which ``polymodal[dev]`` installs.

    python benchmarks/train_vs_openclip.py [--inputs csv-png csv-jpg wds-jpg] [--train-size 8192]
        [--epochs 2] [--batch-size 128] [--lr 1e-3] [--warmup N] [--wd 0.1] [--workers 1] [--threads 2]
        [--rounds 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_machine

# open_clip's registry name for the architecture of polymodal's clip-vit-tiny.
OPEN_CLIP_NAME = "polymodal-clip-vit-tiny"
MODEL = "clip-vit-tiny"
BETAS, EPS = (0.9, 0.98), 1e-6
LAUNCH = "_launch_open_clip"  # hidden first argument: run open_clip's trainer in this process


# ---------------------------------------------------------------------------- open_clip launcher (subprocess)


def _launch_open_clip(argv: list[str]) -> None:
    """``LAUNCH CONFIG_DIR TIMING_JSON THREADS OPEN_CLIP_ARGS...``: register the config, time the epochs."""
    config_dir, timing_path, threads, *train_argv = argv
    torch.set_num_threads(int(threads))
    import open_clip

    open_clip.add_model_config(config_dir)
    import open_clip_train.data as oc_data  # its csv loader needs pandas (a dev dependency of polymodal)
    import open_clip_train.main as oc_main

    # open_clip_train (3.3.0 and earlier) fails on webdataset >= 0.2.96 with KeyError 'fname': webdataset's
    # tar_file_expander now ends each shard with an {} marker that open_clip's grouping does not expect
    # (open_clip #935, webdataset #384). Turning the marker off is the fix its maintainers gave.
    oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)

    epochs: list[dict[str, float]] = []
    train_one_epoch = oc_main.train_one_epoch

    def timed_epoch(model, data, *args, **kwargs):
        loader = data["train"].dataloader
        start = time.perf_counter()
        train_one_epoch(model, data, *args, **kwargs)
        # a csv DataLoader drops its last partial batch; the wds WebLoader has no batch_size, and its
        # num_samples is num_batches full batches
        per_batch = getattr(loader, "batch_size", None) or loader.num_samples // loader.num_batches
        epochs.append({"seconds": time.perf_counter() - start, "samples": loader.num_batches * per_batch})

    oc_main.train_one_epoch = timed_epoch
    result = oc_main.main(train_argv)
    if result is not None and result != 0:
        sys.exit(f"open_clip_train.main returned {result}")
    Path(timing_path).write_text(json.dumps({"epochs": epochs}))


# ---------------------------------------------------------------------------- data


# --inputs: layout -> (write_synthetic format, image format)
INPUTS = {"csv-png": ("csv", "png"), "csv-jpg": ("csv", "jpg"), "wds-jpg": ("wds", "jpg")}
SHARDS = 8  # shards per train split in the wds layout (open_clip wants at least one per worker)


def _write_split(root: Path, split: str, n: int, seed: int, layout: str = "csv-png") -> Path:
    """The split's index.csv (or shard folder), generated unless ``root`` already holds exactly this split."""
    from polymodal.datasets import write_synthetic

    format, image_format = INPUTS[layout]
    manifest = root / "synthetic.json"
    want = ("shapes", split, n, seed, format, image_format)
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        keys = ("kind", "split", "n", "seed", "format")
        if (*(made.get(k) for k in keys), made.get("image_format", "png")) == want:
            return root / "index.csv" if format == "csv" else root
    # overwrite only replaces an earlier write_synthetic output; any other non-empty folder is refused
    return write_synthetic(
        "shapes",
        root,
        n,
        split=split,
        seed=seed,
        format=format,
        image_format=image_format,
        shard_size=-(-n // SHARDS),
        overwrite=True,
        progress=False,
    )


def _shard_pattern(folder: Path) -> str:
    """The brace pattern both trainers expand: ``.../shard-{000000..000007}.tar``."""
    names = sorted(p.stem.removeprefix("shard-") for p in folder.glob("shard-*.tar"))
    return str(folder / f"shard-{{{names[0]}..{names[-1]}}}.tar")


def _write_open_clip_tsv(index_csv: Path, tsv: Path) -> None:
    """Same rows, image paths made absolute (open_clip reads them relative to its working directory)."""
    with open(index_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines = ["image\tcaption"]
    for row in rows:
        if "\t" in row["caption"] or '"' in row["caption"]:
            raise ValueError(f"caption {row['caption']!r} cannot go into an unquoted TSV")
        lines.append(f"{(index_csv.parent / row['image']).resolve()}\t{row['caption']}")
    tmp = tsv.with_name(tsv.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(tsv)


# ---------------------------------------------------------------------------- the two runs


def _run(name: str, command: list[str], log_dir: Path) -> float:
    """Run one trainer; on failure stop with the tail of its stderr (its log goes there)."""
    out, err = log_dir / f"{name}.stdout.log", log_dir / f"{name}.stderr.log"
    print(f"  {name}: training (logs: {err})", flush=True)
    start = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        code = subprocess.call(command, stdout=fo, stderr=fe, cwd=log_dir)
    if code != 0:
        tail = err.read_text(errors="replace").splitlines()[-40:] or out.read_text(errors="replace").splitlines()[-40:]
        sys.exit(f"{name}'s trainer failed with exit code {code}; last lines of its output:\n" + "\n".join(tail))
    return time.perf_counter() - start


def _open_clip_data(data: dict) -> list[str]:
    if data["layout"].startswith("wds"):
        samples = str(data["train_size"])
        return ["--train-data", data["shards"], "--dataset-type", "webdataset", "--train-num-samples", samples]
    return [
        *("--train-data", str(data["tsv"]), "--dataset-type", "csv", "--csv-separator", "\t"),
        *("--csv-img-key", "image", "--csv-caption-key", "caption"),
    ]


def _open_clip_command(args, data: dict, timing: Path, logs: Path, warmup: int) -> list[str]:
    pre = _model_config().input_spec("image")
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        LAUNCH,
        str(data["config_dir"]),
        str(timing),
        str(args.threads),
        *_open_clip_data(data),
        *("--model", OPEN_CLIP_NAME, "--image-mean", *map(str, pre.mean), "--image-std", *map(str, pre.std)),
        *("--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers)),
        *("--lr", str(args.lr), "--wd", str(args.wd), "--warmup", str(warmup), "--grad-clip-norm", str(args.grad_clip)),
        *("--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS)),
        *("--precision", "fp32", "--device", args.device, "--seed", str(args.seed)),
        *("--log-every-n-steps", str(args.log_every), "--save-frequency", "0"),
        *("--logs", str(logs), "--name", "open_clip"),
    ]


def _polymodal_config(args, data: dict, run_dir: Path, steps: int, warmup: int) -> dict:
    if data["layout"].startswith("wds"):
        source = {"source": "wds", "train": data["shards"], "epoch_samples": data["train_size"]}
    else:
        source = {"source": "csv", "train": str(data["train_csv"])}
    return {
        "run_dir": str(run_dir),
        "steps": steps,
        "seed": args.seed,
        "precision": "fp32",
        "device": args.device,
        "threads": args.threads,
        "log_every": args.log_every,
        "eval_every": 0,
        "save_every": 0,
        "keep_checkpoints": 1,
        "tensorboard": False,
        "progress": False,
        "model": {"name": MODEL},
        "data": {
            **source,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "seed": args.seed,
            "augment": True,  # open_clip always trains with its random resized crop; this is the same one
        },
        "optim": {
            "lr": args.lr,
            "weight_decay": args.wd,
            "betas": list(BETAS),
            "eps": EPS,
            "warmup_steps": warmup,
            "grad_clip": args.grad_clip,
        },
    }


def _model_config():
    import polymodal

    return polymodal.get_model_config(MODEL)


def _write_open_clip_config(config_dir: Path) -> None:
    from polymodal.convert import open_clip_model_cfg

    config_dir.mkdir(parents=True, exist_ok=True)
    cfg = open_clip_model_cfg(_model_config())
    (config_dir / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _train_round(args, r: int, root: Path, data: dict[str, Path], steps: int, warmup: int) -> dict[str, dict]:
    """One open_clip run and one polymodal run; throughput and final checkpoint of each."""
    import yaml

    round_dir = root / f"round{r}"
    round_dir.mkdir(parents=True)
    results: dict[str, dict] = {}
    order = ["open_clip", "polymodal"] if r % 2 == 0 else ["polymodal", "open_clip"]
    for name in order:
        if name == "open_clip":
            timing = round_dir / "open_clip_epochs.json"
            logs = round_dir / "open_clip_logs"
            command = _open_clip_command(args, data, timing, logs, warmup)
            wall = _run(name, command, round_dir)
            epochs = json.loads(timing.read_text())["epochs"]
            seconds, samples = sum(e["seconds"] for e in epochs), sum(e["samples"] for e in epochs)
            # "Batch (t): T" is the mean time per step over the log window that line closes
            step_times = [
                float(t)
                for t in re.findall(r"Batch \(t\): ([0-9.]+)", (round_dir / "open_clip.stderr.log").read_text())
            ]
            windows = [args.batch_size / t for t in step_times if t > 0]
            checkpoint = logs / "open_clip" / "checkpoints" / f"epoch_{args.epochs}.pt"
            if not checkpoint.is_file():
                sys.exit(f"open_clip finished but wrote no {checkpoint}")
        else:
            config = round_dir / "polymodal.yaml"
            run_dir = round_dir / "polymodal"
            config.write_text(yaml.safe_dump(_polymodal_config(args, data, run_dir, steps, warmup)))
            wall = _run(name, [sys.executable, "-m", "polymodal", "train", str(config)], round_dir)
            report = json.loads((run_dir / "report.json").read_text())
            seconds, samples = report["train_seconds"], report["samples_seen"]
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            windows = [row["samples_per_s"] for row in rows if "samples_per_s" in row]
            from polymodal.resolver import locate_model

            checkpoint = locate_model(run_dir)  # the run's newest complete checkpoint
        results[name] = {
            "seconds": seconds,
            "samples": samples,
            "windows": windows,
            "checkpoint": checkpoint,
            "wall": wall,
        }
        print(f"    {samples} samples in {seconds:.1f} s: {samples / seconds:.1f} samples/s ({wall:.0f} s in all)")
    if results["open_clip"]["samples"] != results["polymodal"]["samples"]:
        sys.exit(f"the trainers saw different numbers of samples: { {k: v['samples'] for k, v in results.items()} }")
    return results


# ---------------------------------------------------------------------------- evaluation


def _check_import(model, checkpoint: Path, config_dir: Path, images: torch.Tensor, texts: torch.Tensor) -> None:
    """polymodal's import of the open_clip checkpoint computes what open_clip's own model does."""
    import open_clip

    open_clip.add_model_config(config_dir)
    reference = open_clip.create_model(OPEN_CLIP_NAME, pretrained=str(checkpoint)).eval()
    with torch.inference_mode():
        diffs = {
            "image": (reference.encode_image(images) - model.encode_image(images)).abs().max().item(),
            "text": (reference.encode_text(texts) - model.encode_text(texts)).abs().max().item(),
        }
    bad = {k: v for k, v in diffs.items() if v > 1e-4}
    if bad:
        sys.exit(f"polymodal's import of {checkpoint} differs from open_clip's model by {bad}")


def _evaluate(args, results: dict[str, dict], config_dir: Path, heldout_csv: Path) -> dict[str, dict[str, float]]:
    import polymodal
    from polymodal.datasets import ShapesDataset, colour_prompts, read_index, shape_prompts
    from polymodal.train.data import RunData
    from polymodal.train.evaluate import evaluate

    device = torch.device(args.device)
    height, width = _model_config().input_spec("image").image_size
    size = height if height == width else (height, width)
    tokenizer = polymodal.get_tokenizer(MODEL)
    heldout = ShapesDataset(
        "heldout",
        args.eval_size,
        args.seed,
        image_size=size,
        transform=polymodal.get_preprocess(MODEL, "image", is_train=False),
        tokenizer=tokenizer,
    )
    written = [row["caption"] for row in read_index(heldout_csv)]
    if written[:50] != [heldout[i]["meta"]["caption"] for i in range(min(50, len(heldout)))]:
        sys.exit(f"the generated held-out split does not match {heldout_csv}")
    data = RunData(
        train=heldout,
        eval=heldout,
        modalities=("image", "text"),
        zero_shot={"shape": shape_prompts(), "colour": colour_prompts()},
        unseen_key="unseen",
    )
    metrics = {}
    for name in ("polymodal", "open_clip"):
        checkpoint = results[name]["checkpoint"]
        if name == "polymodal":
            model = polymodal.resolve_model(checkpoint)
        else:
            model = polymodal.resolve_model(MODEL, pretrained=checkpoint)
            probe = [heldout[i] for i in range(8)]
            images = torch.stack([p["image"] for p in probe])
            texts = torch.stack([p["text"] for p in probe])
            _check_import(model.eval(), checkpoint, config_dir, images, texts)
        metrics[name], _ = evaluate(model.to(device).eval(), tokenizer, data, device)
    return metrics


# ---------------------------------------------------------------------------- main


def main() -> None:
    if sys.argv[1:2] == [LAUNCH]:
        _launch_open_clip(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS), help="file layouts to train from, in turn"
    )
    parser.add_argument("--train-size", type=int, default=8192, help="training pairs written (one epoch)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out pairs written and evaluated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of the steps)")
    parser.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads in each trainer")
    parser.add_argument("--log-every", type=int, default=20, help="steps between log lines, in both trainers")
    parser.add_argument("--rounds", type=int, default=1, help="train the pair this many times, order swapped")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp dir)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    for flag, value, least in (
        ("--train-size", args.train_size, 1),
        ("--eval-size", args.eval_size, 1),
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--threads", args.threads, 1),
        ("--log-every", args.log_every, 1),
        ("--rounds", args.rounds, 1),
    ):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    steps = args.epochs * (args.train_size // args.batch_size)
    if steps < 1:
        parser.error(f"--train-size {args.train_size} holds no full batch of {args.batch_size}")
    warmup = args.warmup if args.warmup is not None else max(1, steps // 10)

    with tempfile.TemporaryDirectory(prefix="train_vs_openclip_") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(f"writing shapes data to {work} ...", flush=True)
        heldout_csv = _write_split(work / "data" / "heldout", "heldout", args.eval_size, args.seed)
        runs = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
        config_dir = runs / "open_clip_config"
        _write_open_clip_config(config_dir)
        torch_threads = torch.get_num_threads()
        summary = {}
        for layout in args.inputs:
            train = _write_split(work / "data" / layout, "train", args.train_size, args.seed, layout)
            data = {"layout": layout, "config_dir": config_dir, "train_size": args.train_size}
            if layout.startswith("wds"):
                data["shards"] = _shard_pattern(train)
            else:
                data["train_csv"], data["tsv"] = train, train.parent / "train_open_clip.tsv"
                _write_open_clip_tsv(train, data["tsv"])
            rounds = []
            for r in range(args.rounds):
                print(f"{layout}, round {r + 1}/{args.rounds}: {steps} steps of {args.batch_size}", flush=True)
                rounds.append(_train_round(args, r, runs / layout, data, steps, warmup))
            print(f"{layout}: evaluating both final models on the held-out split ...", flush=True)
            torch.set_num_threads(args.threads)
            metrics = _evaluate(args, rounds[0], config_dir, heldout_csv)
            torch.set_num_threads(torch_threads)
            summary[layout] = _report(args, layout, rounds, metrics, steps, warmup)

    print()
    print(f"summary ({args.rounds} round(s) each; ratio = polymodal / open_clip)")
    head = ("input", "polymodal/s", "open_clip/s", "ratio", "window ratio", "shape top-1 pm / oc", "R@5 pm / oc")
    print(f"{head[0]:10}{head[1]:>13}{head[2]:>13}{head[3]:>8}{head[4]:>14}{head[5]:>22}{head[6]:>16}")
    for layout, row in summary.items():
        print(
            f"{layout:10}{row['rate'][0]:>13.1f}{row['rate'][1]:>13.1f}{row['rate'][0] / row['rate'][1]:>8.3f}"
            f"{row['window'][0] / row['window'][1]:>14.3f}{row['shape'][0]:>14.3f} / {row['shape'][1]:.3f}"
            f"{row['r5'][0]:>8.3f} / {row['r5'][1]:.3f}"
        )


def _report(args, layout: str, rounds: list[dict], metrics: dict, steps: int, warmup: int) -> dict:
    """Print one layout's table; return its summary row (polymodal, open_clip) pairs."""
    names = ("polymodal", "open_clip")
    rate = {name: statistics.median(rr[name]["samples"] / rr[name]["seconds"] for rr in rounds) for name in names}
    seconds = {name: statistics.median(rr[name]["seconds"] for rr in rounds) for name in names}
    window = {
        name: statistics.median(w for rr in rounds for w in rr[name]["windows"] or [float("nan")]) for name in names
    }
    print()
    print(
        f"{MODEL} on shapes, {layout}: {args.train_size} train pairs x {args.epochs} epochs = {steps} steps of "
        f"{args.batch_size}, lr {args.lr:g}, warm-up {warmup}, wd {args.wd:g}, clip {args.grad_clip:g}, fp32, "
        f"{args.device}, {args.threads} threads, {args.workers} workers, {args.rounds} round(s); "
        f"held-out {args.eval_size}; torch {torch.__version__}"
    )
    print(f"{'':28}{'polymodal':>12}{'open_clip':>12}{'ratio':>9}")
    print(f"{'train samples/s':28}{rate['polymodal']:>12.1f}{rate['open_clip']:>12.1f}", end="")
    print(f"{rate['polymodal'] / rate['open_clip']:>9.3f}")
    print(f"{'train seconds':28}{seconds['polymodal']:>12.1f}{seconds['open_clip']:>12.1f}")
    print(f"{'median log-window samples/s':28}{window['polymodal']:>12.1f}{window['open_clip']:>12.1f}", end="")
    print(f"{window['polymodal'] / window['open_clip']:>9.3f}")
    rows = [
        ("zero-shot shape top-1", "zeroshot/shape/top1"),
        ("zero-shot colour top-1", "zeroshot/colour/top1"),
        ("zero-shot shape unseen top-1", "zeroshot/shape/unseen_top1"),
        ("text->image R@5", "retrieval/text_to_image/R@5"),
        ("image->text R@5", "retrieval/image_to_text/R@5"),
    ]
    for label, key in rows:
        values = [metrics[name].get(key, float("nan")) for name in names]
        print(f"{label:28}{values[0]:>12.3f}{values[1]:>12.3f}")
    print(flush=True)

    def pair(key):
        return tuple(metrics[name].get(key, float("nan")) for name in names)

    return {
        "rate": tuple(rate[n] for n in names),
        "window": tuple(window[n] for n in names),
        "shape": pair("zeroshot/shape/top1"),
        "r5": pair("retrieval/text_to_image/R@5"),
    }


if __name__ == "__main__":
    main()
