"""Caption generation with and without the key/value cache: same tokens, how much faster.

A ``CaptionDecoder`` with random weights (default: CoCa-base-like width 512, 6 layers, the CLIP
vocabulary, 50 image tokens of width 768) generates captions of fixed length (end-of-text is made
unreachable, so every caption runs to ``--lengths``) by greedy search and by beam search, with the
cache (one new token per step) and without it (the whole prefix every step). Both runs are checked to
give the same tokens, and are timed in interleaved rounds in one process; the figures are medians.

    python benchmarks/generation.py [--batch 16] [--lengths 16 32 64] [--beams 3] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine import describe_machine

from polymodal.tasks.captioning import CaptionDecoder, beam_search, greedy_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images captioned at once")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64], help="caption lengths in tokens")
    parser.add_argument("--beams", type=int, default=3, help="beam width (0 skips beam search)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=50)
    parser.add_argument("--memory-dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    decoder = CaptionDecoder(
        context_length=max(args.lengths) + 1,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        memory_dim=args.memory_dim,
        tie_embeddings=False,
    )
    with torch.no_grad():  # end-of-text always scores 0, far below the best of 49k random logits
        decoder.lm_head.weight[decoder.eos_token_id] = 0.0
        if decoder.lm_head.bias is not None:
            decoder.lm_head.bias[decoder.eos_token_id] = 0.0
    decoder = decoder.to(device).eval()
    memory = torch.randn(args.batch, args.image_tokens, args.memory_dim, device=device)

    searches = {"greedy": lambda n, cache: greedy_search(decoder, memory, max_length=n, use_cache=cache)}
    if args.beams:
        searches[f"beam {args.beams}"] = lambda n, cache: (
            beam_search(decoder, memory, num_beams=args.beams, max_length=n, use_cache=cache).tokens
        )

    def timed(fn, n, cache):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn(n, cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    print(
        f"decoder width {args.width}, {args.layers} layers, vocab {decoder.vocab_size}; {args.batch} images of "
        f"{args.image_tokens} tokens; {device}, {args.threads} threads, {args.rounds} rounds "
        f"(torch {torch.__version__})"
    )
    print(f"{'search':<8} {'tokens':>6} {'cached ms':>10} {'uncached ms':>12} {'speed-up':>9}  same tokens")
    for name, fn in searches.items():
        for n in args.lengths:
            timed(fn, n, True)  # warm-up
            times: dict[bool, list[float]] = {True: [], False: []}
            outs = {}
            for _ in range(args.rounds):
                for cache in (True, False):
                    seconds, outs[cache] = timed(fn, n, cache)
                    times[cache].append(seconds)
            cached, plain = statistics.median(times[True]), statistics.median(times[False])
            same = torch.equal(outs[True], outs[False])
            print(f"{name:<8} {n:>6} {1000 * cached:>10.1f} {1000 * plain:>12.1f} {plain / cached:>8.2f}x  {same}")


if __name__ == "__main__":
    main()
