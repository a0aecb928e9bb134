"""``polymodal convert``: rewrite a model in another checkpoint format (polymodal, Hugging Face, open_clip)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polymodal.errors import InputError

if TYPE_CHECKING:
    from polymodal.config import ModelConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    from polymodal.export import EXPORT_FORMATS

    p = subparsers.add_parser("convert", help="convert weights between polymodal, Hugging Face and open_clip formats")
    p.add_argument("src", help="a model directory (polymodal, Hugging Face CLIP or open_clip) or a weights file")
    p.add_argument("dst", help="output directory (or a .safetensors/.pt file for --to open_clip)")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="output format")
    p.add_argument(
        "--model",
        help="the architecture SRC holds: a registered name or a saved model directory (its config, not its "
        "weights); needed when SRC is a bare weights file",
    )
    p.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the architecture before loading, repeatable: TOWER.ARG=VALUE (image.image_size=96) or a "
        "model config field (embed_dim=256)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["image.image_size=96", "embed_dim=256"]`` as ``resolve_model`` overrides:
    ``{"image": {"image_size": 96}, "embed_dim": 256}`` (values read by the trainer's value parser)."""
    from polymodal.train.config import parse_value

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2:
            raise InputError(
                f"--override {item!r} is not KEY=VALUE with KEY a tower argument (image.image_size=96) "
                "or a model config field (embed_dim=256)"
            )
        if len(parts) == 2:
            tower = overrides.setdefault(parts[0], {})
            if not isinstance(tower, dict):
                raise InputError(f"--override {item!r}: {parts[0]!r} was already given a value")
            tower[parts[1]] = parse_value(raw)
        else:
            overrides[parts[0]] = parse_value(raw)
    return overrides


def run(args: argparse.Namespace) -> int:
    from polymodal.checkpoint import CheckpointError
    from polymodal.export import export_model
    from polymodal.resolver import parse_reference, resolve_model

    src = Path(args.src)
    if args.model is None and not src.is_dir():
        if not src.exists():
            raise FileNotFoundError(f"{str(src)!r} does not exist; expected a model directory or a weights file")
        raise InputError(
            f"{str(src)!r} is a weights file; say which architecture it holds with --model NAME or --model DIR "
            "(see 'polymodal list-models')"
        )
    reference = parse_reference(args.model if args.model is not None else src)
    weights = src if args.model is not None else reference.directory
    overrides = parse_overrides(args.overrides)
    for key, value in overrides.items():
        if isinstance(value, dict) and key not in reference.config.towers:
            raise InputError(
                f"--override {key}.ARG=...: the model has no {key!r} tower; "
                f"its towers are {sorted(reference.config.towers)}"
            )
    try:
        model = resolve_model(reference.config, pretrained=weights, **overrides)
    except CheckpointError as err:
        hints = _resize_hints(weights, _with_overrides(reference.config, overrides))
        if not hints:
            raise
        told = [reason + (f"; pass --override {fix}" if fix else "") for reason, fix in hints]
        raise CheckpointError(f"{err}; " + "; ".join(told)) from None
    out = export_model(model, args.dst, to=args.to, overwrite=args.overwrite)
    print(f"wrote {args.to} model to {out}")
    return 0


def _with_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    from polymodal.resolver import apply_overrides

    return apply_overrides(config, overrides) if overrides else config


def _resize_hints(weights: Path, config: ModelConfig) -> list[tuple[str, str | None]]:
    """Explain a positional table of another size than the model's; read only after loading failed."""
    from polymodal.checkpoint import WEIGHTS_NAME, CheckpointError, read_state_dict
    from polymodal.convert import resize_hints, to_polymodal_state
    from polymodal.resolver import FOREIGN_WEIGHTS

    if weights.is_dir():
        found = [weights / n for n in (WEIGHTS_NAME, *FOREIGN_WEIGHTS) if (weights / n).is_file()]
        if not found:
            return []
        weights = found[0]
    try:
        state = to_polymodal_state(read_state_dict(weights), config)
    except CheckpointError:
        return []
    return resize_hints(state, config)
