"""Checks shared by the encoder and model tests."""

from __future__ import annotations

import hashlib
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test of a module that imports this on one thread: on a busy 2-core machine two threads wait on
    each other, and the many small ops of a tiny model take several times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_all_params_get_grad(module: nn.Module, loss: torch.Tensor) -> None:
    """Backpropagate ``loss`` and require a non-zero gradient on every trainable parameter."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing}"


def assert_checkpointing_matches(module: nn.Module, run: Callable[[], torch.Tensor]) -> None:
    """Gradient checkpointing must leave outputs and gradients unchanged (in training mode)."""
    module.train()
    torch.manual_seed(0)
    ref = run()
    ref.float().square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    module.set_grad_checkpointing(True)
    try:
        torch.manual_seed(0)
        out = run()
        out.float().square().sum().backward()
    finally:
        module.set_grad_checkpointing(False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for n, p in module.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=f"gradient of {n}")


def naive_ranks(query_emb: torch.Tensor, gallery_emb: torch.Tensor, relevant: list[set[int]]) -> list[int]:
    """Rank of each query's best relevant item; items scoring as high as it count against it."""
    ranks = []
    for q, row in enumerate((query_emb.double() @ gallery_emb.double().T).tolist()):
        best = max(row[j] for j in relevant[q])
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j not in relevant[q] and s >= best))
    return ranks


def expected_recall_line(ranks: list[int]) -> dict[str, str]:
    """What a retrieval line should print for these ranks: recall@1/5/10 in %, median and mean rank."""
    out = {f"R@{k}": f"{100 * sum(r <= k for r in ranks) / len(ranks):.1f}" for k in (1, 5, 10)}
    out["median"] = f"{statistics.median(ranks):g}"
    out["mean"] = f"{sum(ranks) / len(ranks):.2f}"
    return out


def printed_recall_line(stdout: str, direction: str) -> dict[str, str]:
    """The figures of the printed retrieval line that starts with ``direction`` (e.g. "text -> image")."""
    line = next(x for x in stdout.splitlines() if x.strip().startswith(direction))
    found = dict(re.findall(r"(R@\d+) ([\d.]+)%", line))
    found["median"] = re.search(r"median rank ([\d.]+)", line).group(1)
    found["mean"] = re.search(r"mean rank ([\d.]+)", line).group(1)
    return found


def cli_run(args: list[str], capsys) -> tuple[int, str, str]:
    """``polymodal ARGS`` through the console script's entry point (``polymodal.cli.main``), in this process:
    its exit status, stdout and stderr. One test per command family still starts the real executable."""
    from polymodal.cli import main

    capsys.readouterr()  # drop what came before
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_fails(args: list[str], capsys, message: str) -> None:
    """``polymodal ARGS`` exits with 2 and its last stderr line (after any progress bar) is an error naming
    ``message``."""
    from polymodal.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and message in err, err


def tiny_contrastive(name: str, towers: dict) -> nn.Module:
    """The registered contrastive config ``name`` shrunk (a 1-block text tower of width 32, 16-wide embeddings,
    each tower's args updated from ``towers``; the image preprocessing follows the image size), randomly
    initialised from seed 0, in eval mode."""
    from polymodal import ModelConfig, build_model, get_model_config

    config = get_model_config(name).to_dict()
    for modality, args in towers.items():
        config["towers"][modality]["args"].update(args)
        if "image_size" in args:
            config["preprocess"]["image_size"] = args["image_size"]
    config["towers"]["text"]["args"].update(width=32, layers=1, heads=2, output_dim=16)
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict({**config, "embed_dim": 16, "name": f"tiny-{name}"})).eval()


# the commit every cached repo of the tests is at
CACHE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, source: Path, commit: str = CACHE_COMMIT, link: Path | None = None) -> Path:
    """Put every file of ``source`` into ``cache`` as the ``main`` revision of ``repo``, as ``hf download`` does:
    content-addressed blobs, a snapshot folder of relative symlinks to them, and ``refs/main``. With ``link``
    (another cached repo folder), blobs of equal content are hard links to its blobs, to save disk."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        blob = root / "blobs" / digest
        if link is not None and (link / "blobs" / digest).is_file():
            os.link(link / "blobs" / digest, blob)
        else:
            blob.write_bytes(data)
        target = snapshot / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root
