"""``polymodal lora merge ADAPTER --out DIR``: fold LoRA adapters into their base, giving a plain model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lora", help="LoRA adapters: merge them into their base model")
    sub = p.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    q = sub.add_parser(
        "merge",
        help="fold adapters into their base and save a plain model",
        description="ADAPTER is an adapter directory (adapter_config.json + adapter.safetensors, e.g. the "
        "adapter/ of a training run with model.lora), or a saved model or training run whose model has "
        "adapters. An adapter directory is loaded onto the base model it names (or --base), which must be "
        "the very base it was trained on.",
    )
    q.add_argument("adapter", metavar="ADAPTER", help="adapter directory, or a model / training run with adapters")
    q.add_argument(
        "--out", required=True, help="output directory of the merged model (must not exist unless --overwrite)"
    )
    q.add_argument("--base", help="the base model, when it moved since the adapter was trained")
    q.add_argument("--pretrained", help="weights for --base when it is a registered name")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from polymodal.lora import is_adapter_directory, load_adapter, merge_lora, read_adapter_config

    from ._common import CommandError, load_model

    cpu = torch.device("cpu")
    if is_adapter_directory(args.adapter):
        data = read_adapter_config(args.adapter)
        base_spec = args.base or data["base"].get("model")
        pretrained = args.pretrained if args.base else (args.pretrained or data["base"].get("pretrained"))
        if not base_spec:
            raise CommandError(f"adapter {args.adapter} does not say where its base model is; give it with --base")
        model = load_adapter(load_model(base_spec, cpu, pretrained), args.adapter)
    else:
        if args.base or args.pretrained:
            raise CommandError(
                f"{args.adapter} is a model with its adapters; --base and --pretrained apply to adapter directories"
            )
        model = load_model(args.adapter, cpu)
        if getattr(getattr(model, "config", None), "lora", None) is None:
            raise CommandError(f"{args.adapter} has no LoRA adapters to merge (its model config has no lora)")
    towers = model.config.lora.towers
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    merged = merge_lora(model)
    out = merged.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"merged {layers} LoRA adapters of the {', '.join(towers)} tower(s) into a plain model at {out}")
    return 0
