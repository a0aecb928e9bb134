"""Contrastive losses in 2 real processes (gloo, CPU, DDP) against one process on the global batch."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polymodal.fusion import ContrastiveAlignment, clip_loss, siglip_loss

WORLD_SIZE = 2
LOCAL_BATCH = 4
INPUT_DIMS = {"audio": 3, "image": 5, "text": 7}

# name -> (loss, modalities, loss kwargs); "clip_no_gather" is the control that must NOT match
CASES = {
    "clip_global": ("clip", ("image", "text"), {"local_loss": False}),
    "clip_local": ("clip", ("image", "text"), {"local_loss": True}),
    "clip_global_3": ("clip", ("audio", "image", "text"), {"local_loss": False}),
    "clip_local_3": ("clip", ("audio", "image", "text"), {"local_loss": True}),
    "siglip": ("siglip", ("image", "text"), {}),
    "siglip_3": ("siglip", ("audio", "image", "text"), {}),
    "clip_no_gather": ("clip", ("image", "text"), {"gather": False}),
    # tiled, with several positives per sample (global group ids) and hard-negative texts from every rank
    "clip_tiled_groups_negatives": ("clip", ("image", "text"), {"tile": 3, "groups": True, "negatives": ("text",)}),
    "clip_local_tiled_groups_negatives": (
        "clip",
        ("audio", "image", "text"),
        {"local_loss": True, "tile": 2, "groups": True, "negatives": ("image", "text")},
    ),
    "clip_dense_groups_negatives": ("clip", ("image", "text"), {"tile": None, "groups": True, "negatives": ("text",)}),
    "siglip_tiled_groups_negatives": (
        "siglip",
        ("image", "text"),
        {"tile": 3, "groups": True, "negatives": ("image", "text")},
    ),
}
GLOBAL_GROUPS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # samples 0-1 and 3-5 are positives across the rank split
NEGATIVES_PER_RANK = 3


class _Towers(nn.Module):
    """Linear stub encoders followed by the alignment, so DDP sees every trained parameter."""

    def __init__(self, modalities, siglip: bool) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(INPUT_DIMS[m], 6) for m in modalities})
        self.align = ContrastiveAlignment(
            dict.fromkeys(modalities, 6),
            embed_dim=4,
            init_logit_scale=2.0,
            init_logit_bias=-3.0 if siglip else None,
        )

    def forward(self, inputs, negative_inputs=None):
        features = self.align({m: enc(inputs[m]) for m, enc in self.encoders.items()})
        negatives = {m: self.align.project(m, self.encoders[m](x)) for m, x in sorted((negative_inputs or {}).items())}
        return features, negatives, self.align.scale(), self.align.logit_bias


def _build(case):
    kind, modalities, _ = CASES[case]
    torch.manual_seed(0)
    return _Towers(modalities, siglip=kind == "siglip").double()


def _global_inputs(modalities):
    g = torch.Generator().manual_seed(1)
    return {
        m: torch.randn(WORLD_SIZE * LOCAL_BATCH, INPUT_DIMS[m], generator=g, dtype=torch.float64) for m in modalities
    }


def _global_negative_inputs(modalities):
    g = torch.Generator().manual_seed(2)
    return {
        m: torch.randn(WORLD_SIZE * NEGATIVES_PER_RANK, INPUT_DIMS[m], generator=g, dtype=torch.float64)
        for m in modalities
    }


def _loss(case, model, rank=None):
    """The case's loss on this rank's share of the global batch (``rank=None``: all of it, one process)."""
    kind, modalities, kwargs = CASES[case]
    kwargs = dict(kwargs)
    share = (lambda x, n: x) if rank is None else (lambda x, n: x[rank * n : (rank + 1) * n])
    inputs = {m: share(x, LOCAL_BATCH) for m, x in _global_inputs(modalities).items()}
    negative_inputs = {
        m: share(x, NEGATIVES_PER_RANK) for m, x in _global_negative_inputs(kwargs.pop("negatives", ())).items()
    }
    if kwargs.pop("groups", False):
        kwargs["groups"] = share(GLOBAL_GROUPS, LOCAL_BATCH)
    features, negatives, scale, bias = model(inputs, negative_inputs)
    if kind == "clip":
        return clip_loss(features, scale, negatives=negatives, **kwargs)
    return siglip_loss(features, scale, bias, negatives=negatives, **kwargs)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for case in CASES:
            model = DistributedDataParallel(_build(case))
            out = _loss(case, model, rank)
            out.loss.backward()
            results[case] = {
                "loss": out.loss.detach(),
                "parts": {k: v.detach() for k, v in out.parts.items()},
                "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path, timeout_s=120.0):
    # fork reuses the parent's imports (spawned children spend ~10 s each re-importing torch & co)
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method=start_method,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1.0):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_losses_match_single_process(tmp_path):
    ranks = _run_workers(tmp_path)
    close = {"rtol": 1e-9, "atol": 1e-10}
    for case in CASES:
        model = _build(case)
        ref = _loss(case, model)
        ref.loss.backward()
        ref_grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in ref_grads.values())

        losses = torch.stack([r[case]["loss"] for r in ranks])
        # DDP averages gradients, so each rank's loss is a share whose mean is the global loss
        mean_grads = {n: torch.stack([r[case]["grads"][n] for r in ranks]).mean(0) for n in ref_grads}
        if case == "clip_no_gather":
            # without the gather each rank only contrasts its own batch: a different, smaller loss
            assert not torch.allclose(losses.mean(), ref.loss.detach(), **close)
            assert not all(torch.allclose(mean_grads[n], ref_grads[n], **close) for n in ref_grads)
            continue
        torch.testing.assert_close(losses.mean(), ref.loss.detach(), **close, msg=case)
        for key, part in ref.parts.items():
            torch.testing.assert_close(
                torch.stack([r[case]["parts"][key] for r in ranks]).mean(),
                part.detach(),
                **close,
                msg=f"{case} {key}",
            )
        if case.startswith("clip_global"):  # the full global matrix on every rank: the same loss everywhere
            for r in ranks:
                torch.testing.assert_close(r[case]["loss"], ref.loss.detach(), **close)
        for name, grad in ref_grads.items():
            for rank, r in enumerate(ranks):  # DDP leaves every rank with the same averaged gradient
                torch.testing.assert_close(r[case]["grads"][name], grad, **close, msg=f"{case} {name} rank {rank}")
