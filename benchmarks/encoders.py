"""Inference throughput of clip-vit-b-32: polymodal against open_clip and Hugging Face transformers.

All three run the *same* weights (random open_clip weights, imported into polymodal and exported to a
Hugging Face directory), checked equal before timing. Implementations are timed in interleaved rounds
in one process, so drift in machine load hits all of them alike; the reported figure is the median
over rounds and the ratio is polymodal / reference.

    python benchmarks/encoders.py [--image-batch 16] [--text-batch 64] [--rounds 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from machine import describe_machine
from transformers import CLIPModel

import polymodal


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _throughput(fn: Callable[[], torch.Tensor], items: int, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return items * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=2, help="batches per implementation per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        torch.save(ref.state_dict(), tmp / "open_clip.pt")
        ours = polymodal.resolve_model("clip-vit-b-32", pretrained=tmp / "open_clip.pt").eval()
        polymodal.export_model(ours, tmp / "hf", to="hf")
        hf = CLIPModel.from_pretrained(tmp / "hf", attn_implementation="sdpa").eval()
    ref, ours, hf = ref.to(device), ours.to(device), hf.to(device)

    spec = ours.config.input_spec("image")
    images = torch.randn(args.image_batch, spec.channels, *spec.image_size, device=device)
    texts = polymodal.get_tokenizer("clip-vit-b-32")(
        [f"a photo of a {w} number {i}" for i, w in zip(range(args.text_batch), ["cat", "dog", "red circle"] * 99)]
    ).to(device)

    image_fns = {
        "polymodal": lambda: ours.encode_image(images),
        "open_clip": lambda: ref.encode_image(images),
        "transformers": lambda: _features(hf.get_image_features(pixel_values=images)),
    }
    text_fns = {
        "polymodal": lambda: ours.encode_text(texts),
        "open_clip": lambda: ref.encode_text(texts),
        "transformers": lambda: _features(hf.get_text_features(input_ids=texts)),
    }
    with torch.inference_mode():
        for kind, fns in (("image", image_fns), ("text", text_fns)):
            outs = {name: fn() for name, fn in fns.items()}
            for name in ("open_clip", "transformers"):
                diff = (outs[name] - outs["polymodal"]).abs().max().item()
                assert diff < 1e-4, f"{kind} outputs differ from {name} by {diff}"

        print(
            f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"image batch {args.image_batch}, text batch {args.text_batch}, {args.rounds} rounds"
        )
        for kind, fns, batch in (
            ("images", image_fns, args.image_batch),
            ("texts", text_fns, args.text_batch),
        ):
            for fn in fns.values():  # warm-up
                fn()
            rates: dict[str, list[float]] = {name: [] for name in fns}
            for r in range(args.rounds):
                order = list(fns) if r % 2 == 0 else list(reversed(fns))
                for name in order:
                    rates[name].append(_throughput(fns[name], batch, args.iters, device))
            med = {name: statistics.median(v) for name, v in rates.items()}
            line = ", ".join(f"{name} {med[name]:.1f} {kind}/s" for name in fns)
            print(f"{kind}: {line}")
            for name in ("open_clip", "transformers"):
                print(f"  ratio polymodal / {name}: {med['polymodal'] / med[name]:.3f}")


if __name__ == "__main__":
    main()
