"""``polymodal caption``: write a caption for each image with a trained captioner."""

from __future__ import annotations

import argparse

import torch

from ._common import CommandError, collect_files, load_images, load_model, pick_device, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption images with a captioner (e.g. one trained with configs/caption.yaml)",
        description="Generate a caption per image: greedy decoding by default, beam search with --beam N, "
        "or sampling with --top-k / --top-p / --temperature.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them")
    p.add_argument("--model", required=True, help="saved captioner or training run directory, or a registered name")
    p.add_argument("--pretrained", help="weights for a registered --model name")
    p.add_argument("--beam", type=int, default=1, metavar="N", help="beam search with N beams (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: rank by log p / length^this")
    p.add_argument("--max-length", type=int, metavar="N", help="most tokens per caption (default: the decoder's limit)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample among the most likely tokens holding P of the mass")
    p.add_argument("--temperature", type=float, help="sampling temperature (sampling only)")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _generation_options(args: argparse.Namespace) -> dict:
    sampling = args.top_k is not None or args.top_p is not None or args.temperature is not None
    if args.beam < 1:
        raise CommandError(f"--beam must be at least 1, got {args.beam}")
    if sampling and args.beam > 1:
        raise CommandError("--beam searches for the most likely caption; --top-k, --top-p and --temperature sample one")
    if args.max_length is not None and args.max_length < 1:
        raise CommandError(f"--max-length must be at least 1, got {args.max_length}")
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise CommandError(f"--top-p is a probability in (0, 1], got {args.top_p}")
    if args.temperature is not None and not args.temperature > 0:
        raise CommandError(f"--temperature must be positive, got {args.temperature}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    options: dict = {"max_length": args.max_length}
    if sampling:
        options.update(do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature or 1.0)
    elif args.beam > 1:
        options.update(num_beams=args.beam, length_penalty=args.length_penalty)
    return options


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from polymodal.factory import get_preprocess, get_tokenizer

    options = _generation_options(args)
    files = collect_files(args.inputs, what="image")
    device = pick_device(args.device)
    model = load_model(args.model, device, args.pretrained)
    if getattr(getattr(model, "config", None), "kind", None) != "captioner" or not hasattr(model, "decoder"):
        kind = getattr(getattr(model, "config", None), "kind", type(model).__name__)
        raise CommandError(
            f"--model {args.model} is a {kind} model without a caption decoder; captioning needs a captioner "
            "(model kind 'captioner'), e.g. one trained with 'polymodal train configs/caption.yaml'"
        )
    limit = model.caption_decoder.context_length - 1
    if options["max_length"] is not None and options["max_length"] > limit:
        raise CommandError(f"--max-length {options['max_length']} is beyond this decoder's limit of {limit} tokens")
    tokenizer = get_tokenizer(model)
    transform = get_preprocess(model, "image")
    if options.get("do_sample"):
        options["generator"] = torch.Generator(device=device).manual_seed(args.seed)

    results = []
    starts = range(0, len(files), args.batch_size)
    for start in tqdm(starts, desc="caption", unit="batch", disable=len(starts) < 2):
        chunk = files[start : start + args.batch_size]
        images = load_images(chunk, transform).to(device)
        with torch.no_grad():
            captions = model.caption(images, tokenizer, **options)
        results += [{"input": str(path), "caption": text} for path, text in zip(chunk, captions)]

    if args.json:
        decoding = "sample" if options.get("do_sample") else ("beam" if args.beam > 1 else "greedy")
        print_json({"model": args.model, "decoding": decoding, "results": results})
        return 0
    for row in results:
        print(f"{row['input']}: {row['caption']}")
    return 0
