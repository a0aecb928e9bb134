"""Contrastive losses that never hold the whole logit matrix: softmax (InfoNCE) and sigmoid terms in tiles.

For rows ``q (R, D)`` and columns ``k (C, D)`` the logits are ``s = scale * q @ k.T``. A naive loss keeps
``s`` (and autograd keeps several tensors of its size) for the backward pass: ``O(R * C)`` memory, 16 GiB
per fp32 copy at a batch of 65,536. Here each function is an ``autograd.Function`` that walks ``s`` in
``tile x tile`` blocks. The forward pass keeps only per-row and per-column statistics (log-sum-exp,
sum of positive logits, number of positives); the backward pass recomputes each block from ``q`` and
``k`` and adds its part of the gradients of ``q``, ``k``, ``scale`` (and ``bias``). Memory is
``O((R + C) * D + tile**2)``; compute is one extra matmul per block over the naive loss.

Positives are given by group ids: ``q_groups (R,)`` and ``k_groups (C,)``, and ``(i, j)`` is a positive
pair when ``q_groups[i] == k_groups[j]``. Distinct ids per pair give CLIP's diagonal; shared ids (two
captions of one image, two images of one class) give several positives; a negative id marks a column
that is only ever a negative (a hard-negative caption). The multi-positive softmax term of a row is
the SupCon-style ``logsumexp_j s_ij - mean_{j positive} s_ij``.

Every block's logits are formed in float32 from the inputs' dtype, and statistics and gradients are
accumulated in float32, so bf16 features lose only the precision of their own products.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_TILE", "check_tile", "tiled_infonce", "tiled_sigmoid"]

DEFAULT_TILE = 2048  # 16 MiB of fp32 logits per block: small next to features of a large batch


def _blocks(n: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


def _backward_blocks(q, k, scale, tile, block_grad):
    """Walk ``q @ k.T`` in blocks again and accumulate the gradients of ``q``, ``k``, ``scale`` and an additive
    bias from ``block_grad(I, J, sim)``: the loss's gradient with respect to the logits of block ``(I, J)``, where
    ``sim`` is that block's ``q[I] @ k[J].T`` in float32 and the logits are ``scale * sim (+ bias)``."""
    grad_q = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    grad_k = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    grad_scale = torch.zeros((), device=q.device)
    grad_bias = torch.zeros((), device=q.device)
    s_scale = scale.float()
    for I in _blocks(q.shape[0], tile):
        qi = q[I]
        for J in _blocks(k.shape[0], tile):
            kj = k[J]
            sim = (qi @ kj.T).float()  # (tile_r, tile_c)
            g = block_grad(I, J, sim)
            grad_scale += (g * sim).sum()
            grad_bias += g.sum()
            g = g * s_scale
            grad_q[I] += g @ kj.float()
            grad_k[J] += g.T @ qi.float()
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_scale, grad_bias


def check_tile(tile: int) -> int:
    """``tile`` if it is a positive integer; ``ValueError`` naming it otherwise."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"the loss tile size must be a positive integer (e.g. 4096), got {tile!r}")
    return tile


class _TiledInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, q_groups, k_groups, tile, columns):
        R, C = q.shape[0], k.shape[0]
        dev = q.device
        row_lse = torch.full((R,), float("-inf"), device=dev)
        row_pos = torch.zeros(R, device=dev)  # sum of positive logits per row
        row_cnt = torch.zeros(R, device=dev)
        col_lse = torch.full((C,), float("-inf"), device=dev)
        col_pos = torch.zeros(C, device=dev)
        col_cnt = torch.zeros(C, device=dev)
        s_scale = scale.float()
        for I in _blocks(R, tile):
            for J in _blocks(C, tile):
                s = (q[I] @ k[J].T).float() * s_scale  # (tile_r, tile_c)
                pos = q_groups[I, None] == k_groups[None, J]  # (tile_r, tile_c)
                s_pos = torch.where(pos, s, 0.0)
                row_lse[I] = torch.logaddexp(row_lse[I], s.logsumexp(dim=1))
                row_pos[I] += s_pos.sum(dim=1)
                row_cnt[I] += pos.sum(dim=1)
                if columns:
                    col_lse[J] = torch.logaddexp(col_lse[J], s.logsumexp(dim=0))
                    col_pos[J] += s_pos.sum(dim=0)
                    col_cnt[J] += pos.sum(dim=0)
        if bool((row_cnt == 0).any()):
            raise ValueError(f"row {int((row_cnt == 0).nonzero()[0])} has no positive column (no matching group id)")
        row_loss = (row_lse - row_pos / row_cnt).mean()
        valid = k_groups >= 0  # columns that are only negatives have no column term
        if columns:
            if bool((col_cnt[valid] == 0).any()):
                raise ValueError("a column has no positive row (no matching group id)")
            col_loss = (col_lse - col_pos / col_cnt.clamp(min=1))[valid].mean()
        else:
            col_loss = row_loss.new_zeros(())
        ctx.save_for_backward(q, k, scale, q_groups, k_groups, row_lse, row_cnt, col_lse, col_cnt)
        ctx.tile, ctx.columns, ctx.n_valid = tile, columns, int(valid.sum())
        return row_loss, col_loss

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        q, k, scale, q_groups, k_groups, row_lse, row_cnt, col_lse, col_cnt = ctx.saved_tensors
        s_scale = scale.float()
        w_row = grad_row.float() / q.shape[0]
        w_col = grad_col.float() / max(ctx.n_valid, 1)
        valid = (k_groups >= 0).float()

        def block_grad(I, J, sim):  # d loss / d logits of one block
            s = sim * s_scale
            pos = (q_groups[I, None] == k_groups[None, J]).float()
            g = w_row * (torch.exp(s - row_lse[I, None]) - pos / row_cnt[I, None])
            if ctx.columns:
                col = torch.exp(s - col_lse[None, J]) - pos / col_cnt[None, J].clamp(min=1)
                g += w_col * col * valid[None, J]
            return g

        grad_q, grad_k, grad_scale, _ = _backward_blocks(q, k, scale, ctx.tile, block_grad)
        return (
            grad_q,
            grad_k,
            grad_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def tiled_infonce(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor | float,
    q_groups: torch.Tensor,
    k_groups: torch.Tensor,
    tile: int = DEFAULT_TILE,
    columns: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean multi-positive softmax loss of the rows of ``s = scale * q @ k.T`` and, with ``columns``,
    of its columns (those with ``k_groups >= 0``), computed in ``tile x tile`` blocks.

    Args:
        q: ``(R, D)`` row features.
        k: ``(C, D)`` column features.
        scale: the logit multiplier (already exponentiated); a tensor gets its gradient.
        q_groups: ``(R,)`` integer group ids of the rows (``>= 0``).
        k_groups: ``(C,)`` group ids of the columns; a negative id: a column that is never positive.
        tile: block side.
        columns: also return the column term (the other direction of a symmetric loss over one matrix).

    Returns:
        ``(row_loss, column_loss)``; the column loss is 0 without ``columns``.
    """
    check_tile(tile)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device).reshape(())
    return _TiledInfoNCE.apply(q, k, scale, q_groups, k_groups, tile, columns)


class _TiledSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias, q_groups, k_groups, tile):
        total = torch.zeros((), device=q.device)
        s_scale, s_bias = scale.float(), bias.float()
        for I in _blocks(q.shape[0], tile):
            for J in _blocks(k.shape[0], tile):
                logits = (q[I] @ k[J].T).float() * s_scale + s_bias  # (tile_r, tile_c)
                signs = (q_groups[I, None] == k_groups[None, J]).float() * 2 - 1
                total -= torch.nn.functional.logsigmoid(signs * logits).sum()
        ctx.save_for_backward(q, k, scale, bias, q_groups, k_groups)
        ctx.tile = tile
        return total / q.shape[0]

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, bias, q_groups, k_groups = ctx.saved_tensors
        s_scale, s_bias = scale.float(), bias.float()
        weight = grad.float() / q.shape[0]

        def block_grad(I, J, sim):  # d/dl of -log sigmoid(z l) is -z sigmoid(-z l)
            signs = (q_groups[I, None] == k_groups[None, J]).float() * 2 - 1
            return -weight * signs * torch.sigmoid(-signs * (sim * s_scale + s_bias))

        grad_q, grad_k, grad_scale, grad_bias = _backward_blocks(q, k, scale, ctx.tile, block_grad)
        return (
            grad_q,
            grad_k,
            grad_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            grad_bias.to(bias.dtype) if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
        )


def tiled_sigmoid(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float,
    q_groups: torch.Tensor,
    k_groups: torch.Tensor,
    tile: int = DEFAULT_TILE,
) -> torch.Tensor:
    """SigLIP's ``-1/R * sum_ij log sigmoid(z_ij * (scale * q_i . k_j + bias))`` in ``tile x tile`` blocks,
    with ``z_ij = +1`` where the group ids match and ``-1`` elsewhere (see ``tiled_infonce`` for the rest)."""
    check_tile(tile)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=q.device).reshape(())
    bias = torch.as_tensor(bias, dtype=torch.float32, device=q.device).reshape(())
    return _TiledSigmoid.apply(q, k, scale, bias, q_groups, k_groups, tile)
