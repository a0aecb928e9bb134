"""Calibration data for ``polymodal quantize`` and ``polymodal prune``: batches of a model's inputs.

``--calibration`` names the built-in data (``shapes``, ``tones``: samples of its training split, so
the held-out split stays unseen), an index file of pairs (``.csv`` / ``.tsv`` / ``.jsonl``: image or
audio plus caption, as ``polymodal train`` reads them), or a folder of images (image inputs only).
Inputs go through the model's own preprocessing and tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import BUILTIN, INDEX_SUFFIXES, CommandError, collect_files, load_images

HELP = "'shapes' or 'tones' (built-in training data), an index file of pairs (.csv/.tsv/.jsonl) or a folder of images"


def add_calibration_arguments(parser, required: bool, note: str = "") -> None:
    """``--calibration DATA`` and ``--calibration-size N``, as ``polymodal quantize`` and ``prune`` take them."""
    parser.add_argument("--calibration", required=required, help=HELP + note)
    parser.add_argument("--calibration-size", type=int, default=256, help="calibration samples (default 256)")


def _pair_dataset(spec: str, model, size: int):
    from polymodal.factory import get_preprocess, get_tokenizer
    from polymodal.train import DataSection, build_datasets

    config = model.config
    modality = config.query_modality
    if spec in BUILTIN:
        holds = "image" if spec == "shapes" else "audio"
        if holds not in config.towers:
            raise CommandError(
                f"--calibration {spec} holds {holds} inputs, but the model's towers are {sorted(config.towers)}"
            )
        cfg = DataSection(source=spec, train_size=size)
    else:
        cfg = DataSection(source="csv", train=spec)
    transform = get_preprocess(config, "image") if modality == "image" else None
    try:
        return build_datasets(cfg, config, get_tokenizer(config), transform, transform).train
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"--calibration {spec}: {err}") from None


def calibration_batches(spec: str, model, size: int, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Up to ``size`` samples of ``spec`` as batches of inputs by modality (see the module doc).

    Raises:
        CommandError: an unknown source, a source that does not fit the model, or no usable sample.
    """
    from torch.utils.data import DataLoader

    from polymodal.datasets import collate_samples

    if size < 1:
        raise CommandError(f"--calibration-size must be at least 1, got {size}")
    path = Path(spec)
    if spec not in BUILTIN and path.is_dir():
        from polymodal.factory import get_preprocess

        if "image" not in model.config.towers:
            raise CommandError(f"--calibration {spec} is a folder of images, but the model has no image tower")
        files = collect_files([spec])[:size]
        images = load_images(files, get_preprocess(model.config, "image"))
        return [{"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
    if spec not in BUILTIN and not path.is_file():
        raise CommandError(
            f"--calibration {spec}: no such file or folder, and not built-in data ({', '.join(BUILTIN)})"
        )
    if spec not in BUILTIN and path.suffix.lower() not in INDEX_SUFFIXES:
        raise CommandError(
            f"--calibration {spec}: expected built-in data, a folder of images or an index file ending in "
            f"{', '.join(INDEX_SUFFIXES)}"
        )
    dataset = _pair_dataset(spec, model, size)
    batches, seen = [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples):
        if len(batch) == 0:  # every sample of this batch was unreadable (counted by the dataset)
            continue
        take = min(len(batch), size - seen)
        batches.append({m: t[:take] for m, t in batch.inputs.items()})
        seen += take
        if seen >= size:
            break
    if seen == 0:
        raise CommandError(f"--calibration {spec} holds no usable samples; calibration needs at least one")
    return batches
