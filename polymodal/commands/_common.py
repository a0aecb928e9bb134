"""What the task commands share: loading a model, collecting input files, writing outputs safely."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal import fileio
from polymodal.checkpoint import CheckpointError
from polymodal.datasets.folder import IMAGE_EXTENSIONS
from polymodal.errors import ConfigError, InputError

# what --data / --calibration may name besides a path: the built-in generated data
BUILTIN = ("shapes", "tones")
# index files of pairs, as the trainer reads them (polymodal.datasets)
INDEX_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
# sound files the commands read (polymodal.datasets.decode_audio)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class CommandError(InputError):
    """A user error on the command line; ``polymodal.cli.main`` prints it and exits with status 2."""


def pick_device(name: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return device


def load_model(spec: str, device: torch.device, pretrained: str | None = None) -> nn.Module:
    """The model ``--model`` names (``polymodal.resolver``: a saved model, training run, Hugging Face
    CLIP or open_clip directory, a hub repo id from the local cache, or a registered name with ``pretrained``
    weights or an open_clip tag), in eval mode on ``device``;
    or a folder written by ``polymodal export``, as a ``DeployedModel`` (on the CPU).

    A bare registered name without weights is refused: its random weights would give meaningless
    predictions that look like real ones.
    """
    from polymodal.deploy import MANIFEST, DeployedModel
    from polymodal.hub import hub_repo_of
    from polymodal.resolver import build_reference, parse_reference

    if (Path(spec) / MANIFEST).is_file():  # a folder written by `polymodal export`: run its files
        if pretrained is not None:
            raise CommandError(f"--model {spec} is an exported model; it already has weights, drop --pretrained")
        return DeployedModel.load(spec)
    missing = CommandError(
        f"--model {spec}: no such model directory, and not a registered model name (see 'polymodal list-models')"
    )
    try:
        reference = parse_reference(spec)
    except FileNotFoundError as err:
        if hub_repo_of(spec) is not None:  # the hub error says where it looked in the cache
            raise CommandError(f"--model {spec}: {err}") from None
        raise missing from None
    except CheckpointError:
        if Path(spec).is_file():
            raise CommandError(
                f"--model {spec} is a file; pass a model directory, or a registered name with --pretrained"
            ) from None
        raise
    except ConfigError:
        raise
    except InputError:  # neither a registered name nor an existing path
        raise missing from None
    weights = reference.check_weights(pretrained, name=f"--model {spec}", option="--pretrained FILE")
    return build_reference(reference, weights, device=device).eval()


def parse_towers(towers: str | None) -> list[str] | None:
    """``--towers image,text`` as a list (``None``: all towers); an empty list is an error."""
    if towers is None:
        return None
    names = [t.strip() for t in towers.split(",") if t.strip()]
    if not names:
        raise CommandError(f"--towers {towers!r} names no tower; expected e.g. image,text")
    return names


def collect_files(
    inputs: Sequence[str], extensions: Iterable[str] = IMAGE_EXTENSIONS, what: str = "image"
) -> list[Path]:
    """Expand files and directories (searched recursively for ``extensions``) into a sorted file list.

    Raises:
        CommandError: a path that does not exist, a directory without any such file, or no inputs.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
            if not found:
                raise CommandError(f"directory {item} holds no {what} files (looked for {', '.join(exts)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CommandError(f"{what} path {item} does not exist")
    if not files:
        raise CommandError(f"no {what} files given")
    return files


def load_images(files: Sequence[Path], transform) -> torch.Tensor:
    """Decode and transform images into a batch ``(N, 3, H, W)``; an unreadable file is an error naming it."""
    from polymodal.datasets import SampleError, decode_image

    batch = []
    for path in files:
        try:
            image = decode_image(path)
        except SampleError as err:
            raise CommandError(f"{path} is not a readable image: {err}") from err
        batch.append(transform(image))
    return torch.stack(batch)


def load_audio_clips(files: Sequence[Path], model: nn.Module) -> torch.Tensor:
    """Decode sound files into a batch ``(N, samples)`` at the audio tower's sample rate, each cut or padded to
    its clip length (the model config's input spec); an unusable file is an error naming it."""
    from polymodal.datasets import SampleError, decode_audio

    spec = model.config.input_spec("audio")
    rate = spec.sample_rate
    num_samples = round(rate * spec.clip_seconds)
    clips = []
    for path in files:
        try:
            clips.append(decode_audio(path, rate, num_samples))
        except SampleError as err:
            raise CommandError(f"{path} is not usable audio: {err}") from err
    return torch.stack(clips)


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Class names from ``--labels "a,b,c"`` or ``--labels-file FILE`` (one per line), checked."""
    if (labels is None) == (labels_file is None):
        raise CommandError("give the class names with exactly one of --labels 'cat,dog' or --labels-file FILE")
    if labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise CommandError(f"label file {labels_file} does not exist")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        source = f"label file {labels_file}"
    else:
        names = [n.strip() for n in labels.split(",")]
        if any(not n for n in names):
            raise CommandError(f"--labels {labels!r} has an empty label; separate non-empty names with commas")
        source = "--labels"
    if not names:
        raise CommandError(f"{source} holds no labels")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CommandError(f"{source} repeats labels {duplicates}; each label must appear once")
    return names


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; refuse to replace a file unless ``--overwrite`` was given."""
    try:
        return fileio.atomic_write_text(path, text, overwrite=overwrite)
    except FileExistsError:
        raise CommandError(f"{path} exists; pass --overwrite to replace it") from None
