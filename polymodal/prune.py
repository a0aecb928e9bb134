"""Structured pruning: remove attention heads and MLP hidden units from a model's transformer towers.

``prune_model(model, batches, heads=0.5, mlp=0.5)`` scores every head and every MLP unit of each
transformer block on calibration data, keeps the most important ones in each block, and returns a
new, smaller *dense* model. Its config records the widths that are left (the towers'
``block_heads`` and ``block_mlp_dims``), so it saves, loads, trains and exports like any model.

Importance scores (``criterion``):

- ``"taylor"`` (default): the first-order estimate of how much the model's own contrastive loss
  changes when a head's (or unit's) output is removed: ``|sum over its outputs of activation * gradient|``
  per sample, summed over the calibration data (Molchanov et al. 2019; Michel et al. 2019 for heads).
  It needs pairs (each tower's inputs) and a contrastive model.
- ``"magnitude"``: the mean norm of what a head (unit) adds to the residual stream. Needs no labels
  and no pairs: only the inputs of the pruned towers.

Each block keeps ``max(1, round(n * (1 - ratio)))`` of its ``n`` heads (and units), so every block
shrinks alike and the speed-up is predictable.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError

PRUNABLE_TYPES = ("vit", "text_transformer")
CRITERIA = ("taylor", "magnitude")

Batch = Mapping[str, torch.Tensor]


@dataclass
class BlockScores:
    """Importance of each head ``(heads,)`` and each MLP hidden unit ``(units,)`` of one block."""

    heads: torch.Tensor
    units: torch.Tensor


@dataclass
class PruneResult:
    """What ``prune_model`` made.

    Attributes:
        model: the pruned model (a new module; the input model is left as it was).
        kept_heads, kept_units: per tower, per block, the indices that were kept (ascending).
        scores: per tower, per block, the importance scores the choice was made on.
        params_before, params_after: parameter counts of the whole model.
    """

    model: nn.Module
    kept_heads: dict[str, list[list[int]]] = field(default_factory=dict)
    kept_units: dict[str, list[list[int]]] = field(default_factory=dict)
    scores: dict[str, list[BlockScores]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def summary(self) -> dict[str, Any]:
        """A JSON-able account: per tower, heads and MLP units before and after in each block, and the parameters."""
        towers = {}
        for modality, heads in self.kept_heads.items():
            blocks = self.scores[modality]
            towers[modality] = {
                "heads_before": [len(b.heads) for b in blocks],
                "heads_after": [len(h) for h in heads],
                "mlp_before": [len(b.units) for b in blocks],
                "mlp_after": [len(u) for u in self.kept_units[modality]],
                "kept_heads": heads,
            }
        return {"towers": towers, "params_before": self.params_before, "params_after": self.params_after}


def check_ratio(name: str, ratio: float | None) -> None:
    """``InputError`` unless ``ratio`` is ``None`` (do not prune that part) or strictly between 0 and 1."""
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise InputError(f"{name} ratio must be strictly between 0 and 1 (the fraction removed), got {ratio!r}")


def prunable_towers(model: nn.Module, towers: Iterable[str] | None = None) -> list[str]:
    """The towers to prune: ``towers`` checked, or every transformer tower of ``model``."""
    config: ModelConfig | None = getattr(model, "config", None)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"pruning rewrites a model's weights; a {type(model).__name__} (an exported folder) has none to "
            "rewrite: prune the model it was exported from"
        )
    if not isinstance(config, ModelConfig):
        raise InputError(f"pruning needs a polymodal model built from a config, got {type(model).__name__}")
    eligible = sorted(m for m, t in config.towers.items() if t.type in PRUNABLE_TYPES)
    if towers is None:
        if not eligible:
            kinds = {m: t.type for m, t in config.towers.items()}
            raise InputError(f"model {config.name!r} has no transformer tower to prune (towers: {kinds})")
        return eligible
    chosen = sorted(set(towers))
    for modality in chosen:
        if modality not in config.towers:
            raise InputError(f"unknown tower {modality!r}; model {config.name!r} has {sorted(config.towers)}")
        if modality not in eligible:
            raise InputError(
                f"the {modality} tower is a {config.towers[modality].type!r} encoder; structured pruning "
                f"takes transformer towers ({', '.join(PRUNABLE_TYPES)})"
            )
    return chosen


def _blocks(model: nn.Module, modality: str) -> nn.ModuleList:
    return model.towers[modality].transformer.blocks


def _contribution_norms(layer: nn.Linear, x: torch.Tensor, group: int) -> torch.Tensor:
    """Per sample, the mean over tokens of the norm of what each group of ``group`` input features of
    ``x (B, N, features)`` adds to the output of ``layer``: ``(B, features // group)``."""
    B, weight = x.shape[0], layer.weight.float()  # (out, features)
    if group == 1:  # a unit adds |a_j| times its column: no need to form (B, N, units, out)
        return (x.float().abs() * weight.norm(dim=0)).mean(dim=1)
    cols = weight.t().reshape(-1, group, layer.out_features)  # (groups, group, out)
    parts = x.float().reshape(B, -1, cols.shape[0], group)  # (B, N, groups, group)
    return torch.einsum("bngk,gko->bngo", parts, cols).norm(dim=-1).mean(dim=1)  # (B, groups)


class _Recorder:
    """Hooks on the inputs of each block's attention output projection and MLP second layer (head
    outputs ``(B, N, heads * head_dim)`` and activated hidden units ``(B, N, units)``), adding up scores."""

    def __init__(self, model: nn.Module, towers: list[str], criterion: str) -> None:
        self.criterion = criterion
        self.pending: list[tuple[BlockScores, str, int, torch.Tensor]] = []
        self.scores: dict[str, list[BlockScores]] = {}
        self.handles = []
        for modality in towers:
            self.scores[modality] = []
            for block in _blocks(model, modality):
                attn = block.attn
                entry = BlockScores(torch.zeros(attn.num_heads), torch.zeros(block.mlp.fc2.in_features))
                self.scores[modality].append(entry)
                self.handles.append(attn.proj.register_forward_hook(self._hook(entry, "heads", attn.head_dim)))
                self.handles.append(block.mlp.fc2.register_forward_hook(self._hook(entry, "units", 1)))

    def _hook(self, entry: BlockScores, part: str, group: int):
        def hook(layer: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0]
            if self.criterion == "magnitude":
                with torch.no_grad():
                    getattr(entry, part).add_(_contribution_norms(layer, x.detach(), group).sum(dim=0).cpu())
                return
            if x.requires_grad:  # its gradient is asked for after the loss (see ``add_taylor``)
                self.pending.append((entry, part, group, x))

        return hook

    def add_taylor(self, loss: torch.Tensor) -> None:
        """Add |activation · gradient| per group and sample for every input recorded since the last call.

        The gradient is taken with respect to the recorded activations only, so autograd skips every
        weight gradient: a backward pass that costs about half of training's."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        grads = torch.autograd.grad(loss, [x for *_, x in pending])
        for (entry, part, group, x), grad in zip(pending, grads):
            B = x.shape[0]
            product = (x.detach().float() * grad.float()).reshape(B, -1, x.shape[-1] // group, group)
            getattr(entry, part).add_(product.sum(dim=(1, 3)).abs().sum(dim=0).cpu())  # per sample, then summed

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _contrastive_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    from polymodal.fusion import clip_loss, siglip_loss

    out = model(**batch)
    embeddings = {m: e.float() for m, e in out.embeddings.items()}
    if out.logit_bias is not None:
        return siglip_loss(embeddings, out.logit_scale.float(), out.logit_bias.float()).loss
    return clip_loss(embeddings, out.logit_scale.float()).loss


def importance_scores(
    model: nn.Module, batches: Iterable[Batch], towers: list[str], criterion: str = "taylor"
) -> dict[str, list[BlockScores]]:
    """Per tower, per block, the importance of each head and MLP unit over ``batches`` (see the module doc).

    Args:
        model: the model; its parameters are not changed (gradients are computed and discarded).
        batches: dicts of inputs by modality: every tower's for ``"taylor"``, the pruned towers' for ``"magnitude"``.
        towers: the towers to score.
        criterion: ``"taylor"`` or ``"magnitude"``.
    """
    if criterion not in CRITERIA:
        raise InputError(f"unknown pruning criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if criterion == "taylor" and getattr(model, "alignment", None) is None:
        raise InputError("criterion 'taylor' scores by the contrastive loss; this model has none: use 'magnitude'")
    device = next(model.parameters()).device
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()  # no dropout: the scores are of the model as it will run
    for p in frozen:  # a frozen model's activations carry no gradient otherwise; no weight gradient is formed
        p.requires_grad_(criterion == "taylor")
    recorder = _Recorder(model, towers, criterion)
    seen = 0
    try:
        for batch in batches:
            if criterion == "taylor":
                missing = sorted(set(model.config.towers) - set(batch))
                if missing:
                    raise InputError(f"criterion 'taylor' needs pairs: calibration batches lack {missing} inputs")
                inputs = {m: batch[m].to(device) for m in model.config.towers}
                with torch.enable_grad():
                    recorder.add_taylor(_contrastive_loss(model, inputs))
            else:
                with torch.no_grad():
                    for modality in towers:
                        if modality not in batch:
                            raise InputError(f"calibration batches lack {modality} inputs for the {modality} tower")
                        model.towers[modality](batch[modality].to(device))
            seen += len(next(iter(batch.values())))
    finally:
        recorder.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    if seen == 0:
        raise InputError("the calibration data is empty; pruning needs samples to score heads and units on")
    return recorder.scores


def _keep(scores: torch.Tensor, ratio: float | None) -> list[int]:
    n = len(scores)
    if ratio is None:
        return list(range(n))
    k = max(1, round(n * (1.0 - ratio)))
    return sorted(scores.topk(k).indices.tolist())


def _select_block(state: dict[str, torch.Tensor], prefix: str, heads: list[int], units: list[int], block) -> None:
    """Cut one block's tensors in ``state`` (a state dict, in place) down to the kept heads and units."""
    attn = block.attn
    hd, inner = attn.head_dim, attn.inner_dim
    cols = torch.tensor([h * hd + i for h in heads for i in range(hd)])  # kept positions of (heads * head_dim)
    rows = torch.cat([cols + part * inner for part in range(3)])  # of the fused q, k, v
    units_t = torch.tensor(units)
    cuts = {
        "attn.qkv.weight": (0, rows),
        "attn.qkv.bias": (0, rows),
        "attn.proj.weight": (1, cols),
        "mlp.fc1.weight": (0, units_t),
        "mlp.fc1.bias": (0, units_t),
        "mlp.fc2.weight": (1, units_t),
    }
    for name, (dim, index) in cuts.items():
        key = f"{prefix}{name}"
        if key in state:
            state[key] = state[key].index_select(dim, index.to(state[key].device)).contiguous()


def prune_model(
    model: nn.Module,
    batches: Iterable[Batch],
    heads: float | None = 0.5,
    mlp: float | None = 0.5,
    towers: Iterable[str] | None = None,
    criterion: str = "taylor",
) -> PruneResult:
    """A copy of ``model`` without the least important ``heads`` / ``mlp`` fraction of each block's
    attention heads / MLP hidden units in ``towers`` (default: every transformer tower).

    Args:
        model: a polymodal model (its config is the home of the new widths).
        batches: calibration batches, dicts of inputs by modality (see ``importance_scores``).
        heads: fraction of each block's heads to remove, in (0, 1); ``None`` keeps them all.
        mlp: fraction of each block's MLP hidden units to remove, in (0, 1); ``None`` keeps them all.
        towers: which towers to prune.
        criterion: ``"taylor"`` or ``"magnitude"``.
    """
    from .model import build_model

    check_ratio("heads", heads)
    check_ratio("mlp", mlp)
    if heads is None and mlp is None:
        raise InputError("nothing to prune: give a heads ratio, an mlp ratio, or both")
    chosen = prunable_towers(model, towers)
    scores = importance_scores(model, batches, chosen, criterion)
    config = copy.deepcopy(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = PruneResult(model=model, scores=scores)
    for modality in chosen:
        blocks = _blocks(model, modality)
        kept_h = [_keep(s.heads, heads) for s in scores[modality]]
        kept_u = [_keep(s.units, mlp) for s in scores[modality]]
        for i, block in enumerate(blocks):
            _select_block(state, f"towers.{modality}.transformer.blocks.{i}.", kept_h[i], kept_u[i], block)
        args = config.towers[modality].args
        args["block_heads"] = [len(h) for h in kept_h]
        args["block_mlp_dims"] = [len(u) for u in kept_u]
        result.kept_heads[modality], result.kept_units[modality] = kept_h, kept_u
    parameter = next(model.parameters())
    pruned = build_model(config, device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.train(model.training)
    result.model = pruned
    result.params_before = sum(p.numel() for p in model.parameters())
    result.params_after = sum(p.numel() for p in pruned.parameters())
    return result
