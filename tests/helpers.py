"""Checks shared by the encoder and model tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
