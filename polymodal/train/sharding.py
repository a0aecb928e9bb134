"""FSDP2 for the trainer (``distributed.strategy: fsdp``): what is sharded, in which precision, and the full
(unsharded) state of a sharded model, its optimiser and its EMA for checkpoints.

Each encoder's blocks are sharded on their own (``fully_shard``), then the root model takes the rest. A
block's parameters are gathered just before it runs and freed after it, so a rank holds one block's whole
weights at a time, plus its shards of everything. Checkpoints stay what a single process writes: the
weights and optimiser state are gathered whole onto rank 0 (every rank takes part) and written there; on
resume every rank reads the whole state and keeps its shards.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from polymodal.encoders import Encoder

__all__ = [
    "average_replicated_grads",
    "full_model_state",
    "full_optimizer_state",
    "full_tensors",
    "load_optimizer_state",
    "mixed_precision_policy",
    "plain_tensor",
    "replicated_parameters",
    "shard_blocks",
    "shard_like",
    "shard_model",
    "unsharded_copy",
]

# Gathered whole on rank 0 only, in CPU memory, so no rank ever holds a second whole model on its device.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: each encoder's layer groups that are one submodule each.

    ``Encoder.layer_groups`` is where an encoder says how it is built from input to output (what
    ``model.lock`` unfreezes group by group), so the blocks are not guessed from names: a ViT's and a text
    transformer's blocks, a ResNet's stages, the audio CNN's conv blocks, a timm trunk's blocks and a
    Hugging Face stack's layers. A group spread over several modules (a ViT's stem: patch embedding,
    position table, class token) stays with the root, as does everything outside an encoder.
    """
    blocks = []
    for encoder in (m for m in model.modules() if isinstance(m, Encoder)):
        owners: dict[frozenset[int], nn.Module] = {}
        for module in encoder.modules():  # outermost first: a wrapper, not what it wraps, owns the group
            owners.setdefault(frozenset(id(p) for p in module.parameters()), module)
        for group in encoder.layer_groups():
            owner = owners.get(frozenset(id(p) for p in group))
            if group and owner is not None and owner is not encoder:
                blocks.append(owner)
    return blocks


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 cannot shard, scalars (a contrastive model's temperature and bias): every rank
    keeps them whole and ``average_replicated_grads`` averages their gradients, as DDP would."""
    return [p for p in model.parameters() if p.ndim == 0]


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy of the run's ``precision``: under bf16, weights are gathered and used in bf16 while
    gradients are reduced (and the optimiser steps) in float32; under fp32 everything stays float32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, device: torch.device, world: int, precision: str) -> tuple[int, list[nn.Parameter]]:
    """Shard ``model`` in place over ``world`` ranks (blocks first, then the root); returns how many blocks were
    sharded on their own and the parameters left replicated (``replicated_parameters``). Build the optimiser
    and the EMA afterwards, from the sharded model."""
    mesh = init_device_mesh(device.type, (world,))
    replicated = replicated_parameters(model)
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(precision),
        "ignored_params": set(replicated),
    }
    blocks = shard_blocks(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return len(blocks), replicated


def average_replicated_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of the ``replicated_parameters`` over the ranks (one all-reduce for all of them).

    Which parameters have a gradient depends on the task's loss, never on a rank's data, so every rank
    reduces the same list.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = torch.stack([p.grad for p in params])
    dist.all_reduce(grads)  # a sum: gloo has no average
    for param, grad in zip(params, grads / world):
        param.grad.copy_(grad)


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a plain tensor: a DTensor's whole value (e.g. the replicated gradient norm that
    ``clip_grad_norm_`` returns over sharded gradients), anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole copies of ``tensors`` (sharded or not) in CPU memory on rank 0, ``{}`` on the other ranks; every
    rank must call it (each sharded tensor is gathered from all of them, one at a time)."""
    rank0 = dist.get_rank() == 0
    full = {}
    for key, value in tensors.items():
        value = plain_tensor(value.detach())
        if rank0:
            full[key] = value.cpu()
    return full


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``full`` (whole tensors, the same on every rank) cut into the shards that ``like`` holds on this rank."""
    out = {}
    for key, value in full.items():
        reference = like[key]
        value = value.to(device=reference.device, dtype=reference.dtype)
        if isinstance(reference, DTensor):
            # every rank read the same file, so each cuts its own shard without any communication
            value = distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)
        out[key] = value
    return out


def unsharded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in CPU memory (made before sharding), without a second copy on the accelerator;
    rank 0 evaluates and writes checkpoints with it, loaded with the gathered weights."""
    device = next(model.parameters()).device
    replica = copy.deepcopy(model.to("cpu"))
    model.to(device)
    return replica


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s whole state dict in CPU memory on rank 0 (``{}`` elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=_FULL_ON_RANK0)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimiser state on rank 0 (``{}`` elsewhere), laid out as ``optimizer.state_dict()`` of the
    unsharded model (parameters numbered in group order), so a checkpoint resumes under either strategy.
    Every rank must call it."""
    state = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)
    if not state:
        return {}
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimiser state (``full_optimizer_state``'s or a single process's ``state_dict()``) into the
    optimiser of the sharded ``model``: each rank keeps its shards. Every rank must call it with the same state."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
