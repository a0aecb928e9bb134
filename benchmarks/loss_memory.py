"""Peak memory and time of one forward + backward of a contrastive loss: naive, tiled, and open_clip's.

    python benchmarks/loss_memory.py                      # batches 1k to 64k, embedding size 512, CPU
    python benchmarks/loss_memory.py --device cuda        # on a GPU: torch.cuda.max_memory_allocated
    python benchmarks/loss_memory.py --batches 1024 4096 --losses clip

Each point (loss, implementation, batch) runs in its own subprocess, so one point's allocations never
hide in another's. On CPU the subprocess builds its features (two L2-normalised ``(B, D)`` float32
tensors that need gradients) and then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``);
the figure is the peak resident memory of the forward + backward pass above that baseline, read from
``VmHWM``: it sees every allocator peak, also the short-lived B x B temporaries of a naive backward. The
feature gradients (``2 * B * D`` floats) count as part of the loss's memory. On CUDA the figure is
``max_memory_allocated`` above the features.

Implementations:
- ``naive``: ``polymodal.fusion.clip_loss`` / ``siglip_loss`` with ``tile=None`` (the whole matrix);
- ``tiled``: the same with ``tile=--tile`` (``polymodal.fusion.tiled``; default its ``DEFAULT_TILE``);
- ``open_clip``: ``open_clip.loss.ClipLoss`` / ``SigLipLoss``.

A whole-matrix implementation is not run at a batch whose predicted peak (its measured bytes per logit at
the largest batch it ran, times B^2) would not fit in the memory available; the table prints the
prediction instead. Time is the median of ``--repeats`` runs after the measured one (one run above 16k).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from polymodal.fusion.tiled import DEFAULT_TILE

HERE = Path(__file__).resolve().parent
IMPLEMENTATIONS = ("naive", "tiled", "open_clip")
GIB = 1024**3


def _rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _loss_fn(loss: str, impl: str, tile: int):
    from polymodal.fusion import clip_loss, siglip_loss

    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        if loss == "clip":
            module = ClipLoss()
            return lambda q, k, s, b: module(q, k, s)
        module = SigLipLoss()
        return lambda q, k, s, b: module(q, k, s, b)
    block = None if impl == "naive" else tile
    if loss == "clip":
        return lambda q, k, s, b: clip_loss({"image": q, "text": k}, s, tile=block).loss
    return lambda q, k, s, b: siglip_loss({"image": q, "text": k}, s, b, tile=block).loss


def run_point(loss: str, impl: str, batch: int, dim: int, tile: int, device: str, repeats: int) -> dict:
    """One measurement, in this process (the parent runs each in a fresh subprocess)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dev).requires_grad_()
    k = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(dev).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), device=dev).exp().detach().requires_grad_()
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    fn = _loss_fn(loss, impl, tile)

    def step():
        q.grad = k.grad = scale.grad = bias.grad = None
        value = fn(q, k, scale, bias)
        value.backward()
        return float(value)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        value = step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
        method = "cuda max_memory_allocated"
    else:
        base_kib = _status_kib("VmRSS")
        method = "peak RSS (VmHWM after clear_refs)" if _rss_reset() else "peak RSS (ru_maxrss, not reset)"
        start = time.perf_counter()
        value = step()
        first = time.perf_counter() - start
        peak = (_status_kib("VmHWM") - base_kib) * 1024
    times = [first]
    for _ in range(repeats if batch <= 16384 else 0):
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "loss": loss,
        "impl": impl,
        "batch": batch,
        "peak_bytes": peak,
        "seconds": statistics.median(times[1:] or times),
        "value": value,
        "method": method,
    }


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _subprocess_point(args, loss: str, impl: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--point", loss, impl, str(batch), "--dim", str(args.dim)]
    cmd += ["--tile", str(args.tile), "--device", args.device, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"loss": loss, "impl": impl, "batch": batch, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_gib(n: float) -> str:
    return f"{n / GIB:.3f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="block side of the tiled loss")
    parser.add_argument("--losses", nargs="+", choices=("clip", "siglip"), default=["clip", "siglip"])
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the measured one (B <= 16k)")
    parser.add_argument("--point", nargs=3, metavar=("LOSS", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        loss, impl, batch = args.point
        print(json.dumps(run_point(loss, impl, int(batch), args.dim, args.tile, args.device, args.repeats)))
        return

    sys.path.insert(0, str(HERE))
    from machine import describe_machine

    print(describe_machine(), flush=True)
    feature_bytes = 2 * 4 * args.dim
    print(f"embedding size {args.dim}, tile {args.tile}, device {args.device}; memory above the two feature tensors")
    methods: set[str] = set()
    header = f"{'loss':<7}{'impl':<11}{'batch':>7}{'peak GiB':>11}{'x features':>12}{'seconds':>10}{'x naive':>9}"
    for loss in args.losses:
        print("\n" + header)
        per_logit: dict[str, float] = {}
        naive_time: dict[int, float] = {}
        for batch in args.batches:
            for impl in args.impls:
                whole_matrix = impl != "tiled"
                if whole_matrix and impl in per_logit:
                    predicted = per_logit[impl] * batch * batch
                    if predicted > 0.8 * _available_bytes(args.device):
                        print(
                            f"{loss:<7}{impl:<11}{batch:>7}   not run: predicted {_fmt_gib(predicted)} GiB "
                            f"({per_logit[impl]:.1f} bytes per logit), {_fmt_gib(_available_bytes(args.device))} "
                            "GiB available",
                            flush=True,
                        )
                        continue
                r = _subprocess_point(args, loss, impl, batch)
                if "error" in r:
                    print(f"{loss:<7}{impl:<11}{batch:>7}   failed: {r['error']}", flush=True)
                    continue
                methods.add(r["method"])
                if whole_matrix:
                    per_logit[impl] = r["peak_bytes"] / batch**2
                if impl == "naive":
                    naive_time[batch] = r["seconds"]
                ratio = f"{r['seconds'] / naive_time[batch]:.2f}" if batch in naive_time else "-"
                print(
                    f"{loss:<7}{impl:<11}{batch:>7}{_fmt_gib(r['peak_bytes']):>11}"
                    f"{r['peak_bytes'] / (feature_bytes * batch):>12.2f}{r['seconds']:>10.3f}{ratio:>9}"
                    f"   loss {r['value']:.6f}",
                    flush=True,
                )
    print(f"\nmemory measured as: {', '.join(sorted(methods))}")


if __name__ == "__main__":
    main()
