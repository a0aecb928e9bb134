"""``polymodal benchmark``: zero-shot classification, image-text retrieval or a linear probe of a model on a
dataset in a standard layout (``polymodal.datasets.benchmark_layouts``: an image folder, clip_benchmark's
WebDataset export, a Karpathy caption file), with a JSON result file and, for classification, a
confusion-matrix PNG (the metrics: ``polymodal.tasks.benchmark``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polymodal.errors import PolymodalError

from ._common import CommandError, atomic_write_text, load_model, pick_device, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from polymodal.datasets.benchmark_layouts import LAYOUTS
    from polymodal.tasks.benchmark import BENCHMARK_TASKS

    p = subparsers.add_parser(
        "benchmark",
        help="zero-shot accuracy, retrieval recall@1/5/10 or a linear probe on a standard dataset layout",
        description="Evaluate MODEL on DATASET: an image folder (DIR/<class>/<image>, or DIR/train/... and "
        "DIR/test/...), a clip_benchmark WebDataset export (classnames.txt, zeroshot_classification_templates.txt, "
        "test/0.tar, ...) or a Karpathy caption file (dataset_coco.json, dataset_flickr30k.json).",
    )
    p.add_argument("--model", required=True, help="saved model directory, or a registered name with --pretrained")
    p.add_argument("--pretrained", help="weights for a registered --model name")
    p.add_argument("--task", required=True, choices=BENCHMARK_TASKS)
    p.add_argument("--dataset", required=True, help="the dataset folder, or a Karpathy caption .json file")
    p.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto", help="default: told from the files")
    p.add_argument("--split", default="test", help="the split evaluated (default test)")
    p.add_argument("--train-split", default="train", help="linear-probe: the split the probe is fitted on")
    p.add_argument(
        "--classnames",
        metavar="FILE",
        help="one class name per line: the folder names in any order, or one display name per folder in sorted "
        "folder order (WebDataset: line i names class i, replacing classnames.txt)",
    )
    p.add_argument(
        "--templates",
        help="zeroshot: a file of templates, one per line with {c} or {} for the class name, or a built-in set "
        "(simple_image, image_ensemble); default: the dataset's templates file, else simple_image",
    )
    p.add_argument("--images-root", help="Karpathy captions: the folder of the images (default: the file's folder)")
    p.add_argument(
        "--val-split",
        type=float,
        metavar="FRACTION",
        help="linear-probe: test on this share of the training images instead of a test split",
    )
    p.add_argument("--weight-decay", type=float, help="linear-probe: the L2 strength (default: searched)")
    p.add_argument("--seed", type=int, default=0, help="linear-probe: seed of the held-out splits")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--out", help="directory for the JSON result and the confusion-matrix PNG")
    p.add_argument("--overwrite", action="store_true", help="replace result files already in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise CommandError(f"--num-workers must be 0 or more, got {args.num_workers}")
    only = {
        "--classnames": (args.classnames, ("zeroshot", "linear-probe")),
        "--templates": (args.templates, ("zeroshot",)),
        "--val-split": (args.val_split, ("linear-probe",)),
        "--weight-decay": (args.weight_decay, ("linear-probe",)),
    }
    for flag, (value, tasks) in only.items():
        if value is not None and args.task not in tasks:
            raise CommandError(f"{flag} is for --task {' or '.join(tasks)}, not {args.task}")
    if args.val_split is not None and not 0.0 < args.val_split < 1.0:
        raise CommandError(f"--val-split is a fraction in (0, 1), e.g. 0.2; got {args.val_split}")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise CommandError(f"--weight-decay must be 0 or more, got {args.weight_decay}")


def _templates(args: argparse.Namespace, from_layout: list[str] | None) -> tuple:
    from polymodal.datasets.benchmark_layouts import TEMPLATES_FILE, read_templates
    from polymodal.tasks import check_templates

    from .zeroshot import load_templates

    if args.templates is not None and not Path(args.templates).is_file():
        return load_templates(args.templates, "image")  # a built-in set, or the error naming the choices
    if args.templates is None and from_layout is None:
        return load_templates(None, "image")
    source = f"--templates {args.templates}" if args.templates else str(Path(args.dataset) / TEMPLATES_FILE)
    try:
        return check_templates(read_templates(args.templates) if args.templates else from_layout)
    except ValueError as err:
        raise CommandError(f"{source}: {err}") from None


def _wds_class_names(args: argparse.Namespace, layout) -> list[str]:
    from polymodal.datasets.benchmark_layouts import CLASSNAMES_FILE, read_class_names

    if layout.dataset_type != "classification":
        raise CommandError(
            f"{layout.root} is a {layout.dataset_type} dataset; --task {args.task} needs labelled images"
        )
    if args.classnames is None:
        if layout.class_names is None:
            raise CommandError(f"{layout.root} has no {CLASSNAMES_FILE}; give --classnames FILE (line i names class i)")
        return layout.class_names
    names = read_class_names(args.classnames)
    if layout.class_names is not None and len(names) != len(layout.class_names):
        raise CommandError(
            f"--classnames {args.classnames} has {len(names)} class names but {layout.root / CLASSNAMES_FILE} has "
            f"{len(layout.class_names)}; give one name per class"
        )
    return names


def _folder_data(args: argparse.Namespace, root: Path, transform):
    """An image folder and its class names (the folders', or ``--classnames`` matched to them)."""
    from polymodal.datasets import ImageFolderDataset
    from polymodal.datasets.benchmark_layouts import match_folder_classes, read_class_names

    data = ImageFolderDataset(root, transform)
    if args.classnames is None:
        return data, data.classes
    return data, match_folder_classes(
        data.classes, read_class_names(args.classnames), f"--classnames {args.classnames}"
    )


def _classification_data(args: argparse.Namespace, layout: str, path: Path, split: str, transform):
    """(dataset, class names, the layout's templates or None) of one split of labelled images."""
    from polymodal.datasets import WdsBenchmarkDataset, read_clip_benchmark_wds
    from polymodal.datasets.benchmark_layouts import class_folder_root

    if layout == "wds":
        info = read_clip_benchmark_wds(path, split)
        return WdsBenchmarkDataset(info, transform), _wds_class_names(args, info), info.templates
    data, names = _folder_data(args, class_folder_root(path, split) if split else path, transform)
    return data, names, None


def _probe_splits(args: argparse.Namespace, layout: str, path: Path, transform):
    """(training data, test data or None with --val-split, class names) of a linear probe. With --val-split
    the probe trains on the training split, or on the whole dataset (the --split shards) without one."""
    train_split = args.train_split
    if args.val_split is not None:
        if not (path / train_split).is_dir():
            train_split = args.split if layout == "wds" else ""
        train, names, _ = _classification_data(args, layout, path, train_split, transform)
        return train, None, names
    missing = [s for s in (train_split, args.split) if not (path / s).is_dir()]
    if missing:
        raise CommandError(
            f"--dataset {path} has no {' and no '.join(s + '/' for s in missing)} split; a linear probe fits on "
            f"{train_split}/ and tests on {args.split}/, or give --val-split FRACTION to test on a held-out share"
        )
    train, names, _ = _classification_data(args, layout, path, train_split, transform)
    test, _, _ = _classification_data(args, layout, path, args.split, transform)
    if layout == "folder" and test.classes != train.classes:
        raise CommandError(
            f"the class folders of {path / args.split} ({test.classes[:8]}) differ from those of "
            f"{path / train_split} ({train.classes[:8]}); both splits need the same classes"
        )
    return train, test, names


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from polymodal.datasets import (
        CaptionedImageDataset,
        WdsBenchmarkDataset,
        collate_samples,
        read_clip_benchmark_wds,
        read_karpathy,
    )
    from polymodal.datasets.benchmark_layouts import resolve_layout
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.tasks import format_benchmark, linear_probe_benchmark, retrieval_benchmark, zero_shot_benchmark

    _check_options(args)
    layout, path = resolve_layout(args.dataset, args.split, args.layout)
    readable = {"retrieval": ("karpathy", "wds")}.get(args.task, ("folder", "wds"))
    if layout not in readable:
        raise CommandError(f"--task {args.task} reads {' or '.join(readable)} datasets; --dataset {path} is {layout}")
    if args.images_root is not None and layout != "karpathy":
        raise CommandError("--images-root is for Karpathy caption files (dataset_coco.json, dataset_flickr30k.json)")
    name = path.stem if path.is_file() else path.resolve().name
    out = Path(args.out) if args.out else None
    targets = []
    if out is not None:
        targets = [out / f"{name}_{args.task}.json"]
        if args.task != "retrieval":
            targets.append(out / f"{name}_{args.task}_confusion.png")
        existing = [str(t) for t in targets if t.exists()]
        if existing and not args.overwrite:
            raise CommandError(f"{', '.join(existing)} exists; pass --overwrite to replace it")

    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    towers = sorted(getattr(model, "towers", {}))
    needed = ["image"] if args.task == "linear-probe" else ["image", "text"]
    if not set(needed) <= set(towers) or not hasattr(model, "encode_image"):
        raise CommandError(f"--task {args.task} needs a model with {' and '.join(needed)} towers; it has {towers}")
    transform = get_preprocess(model, "image", is_train=False)
    progress = not args.no_progress

    def loader(data) -> DataLoader:
        return DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_samples)

    try:
        if args.task == "zeroshot":
            data, names, layout_templates = _classification_data(args, layout, path, args.split, transform)
            templates = _templates(args, layout_templates)
            result = zero_shot_benchmark(
                model, get_tokenizer(model), loader(data), names, templates, device=device, progress=progress
            )
        elif args.task == "retrieval":
            if layout == "karpathy":
                data = CaptionedImageDataset(read_karpathy(path, args.split, args.images_root), transform)
            else:
                info = read_clip_benchmark_wds(path, args.split)
                if info.dataset_type != "retrieval":
                    raise CommandError(f"{path} is a {info.dataset_type} dataset; --task retrieval needs captions")
                data = WdsBenchmarkDataset(info, transform)
            result = retrieval_benchmark(
                model, get_tokenizer(model), loader(data), args.batch_size, device=device, progress=progress
            )
        else:
            train, test, names = _probe_splits(args, layout, path, transform)
            result = linear_probe_benchmark(
                model,
                loader(train),
                loader(test) if test is not None else None,
                names,
                val_fraction=args.val_split,
                weight_decay=args.weight_decay,
                seed=args.seed,
                device=device,
                progress=progress,
            )
    except PolymodalError:  # a layout error or a bad option: its message names the file or flag
        raise
    except ValueError as err:
        raise CommandError(f"--dataset {path}: {err}") from err

    report = result.to_json(name, str(args.model), layout=layout, split=args.split, dataset_path=str(path))
    if out is not None:
        if result.classification is not None:
            from polymodal.tasks import plot_confusion

            title = f"{name}: {args.task}, top-1 {100 * result.metrics['top1']:.1f}%"
            plot_confusion(result.classification.confusion, names, targets[1], title=title, overwrite=True)
        atomic_write_text(targets[0], json.dumps(report, indent=2) + "\n", overwrite=True)  # checked above
    if args.json:
        print_json(report)
        return 0
    skipped = ", ".join(f"{r} {n}" for r, n in sorted(result.skipped.items()))
    print(
        f"{args.task} of {args.model} on {name} ({layout}, split {args.split}): {result.num_samples} images"
        + (f", {result.num_skipped} skipped ({skipped})" if skipped else "")
    )
    for line in format_benchmark(result):
        print(f"  {line}")
    if targets:
        print("wrote " + " and ".join(str(t) for t in targets))
    return 0
