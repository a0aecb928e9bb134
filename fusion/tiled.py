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
captions of one image, two images of one class) give several positives; a negative id never matches,
so it marks a column (or, for the sigmoid loss, a row) that is only ever a negative (a hard-negative
caption). The multi-positive softmax term of a row is
the SupCon-style ``logsumexp_j s_ij - mean_{j positive} s_ij``.

Every block's logits are formed in float32 (float64 for float64 features) from the inputs (bf16
features are widened before the product), and statistics and gradients are accumulated in that
precision; gradients are returned in the features' dtype. So bf16 features lose only their own
rounding, and that of their gradients.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_TILE", "check_tile", "positive_mask", "tiled_infonce", "tiled_sigmoid"]

DEFAULT_TILE = 2048  # 16 MiB of fp32 logits per block: small next to features of a large batch


def _blocks(n: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, n)) for start in range(0, n, tile)]


def positive_mask(q_groups: torch.Tensor, k_groups: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` bool: the pairs whose group ids match; a negative id never does (the one positive rule)."""
    return (q_groups[:, None] == k_groups[None, :]) & (k_groups[None, :] >= 0)


def _positive(q_groups: torch.Tensor, k_groups: torch.Tensor, I: slice, J: slice) -> torch.Tensor | None:
    """``positive_mask`` of block ``(I, J)``, or ``None`` when the block has no positive, found from the ids
    alone (most blocks of a large batch)."""
    rows, cols = q_groups[I], k_groups[J]
    if not bool(torch.isin(rows, cols[cols >= 0]).any()):
        return None
    return positive_mask(rows, cols)


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype blocks are computed and accumulated in: float32, or the features' own if wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _logits(qs: torch.Tensor, kj: torch.Tensor, bias: float) -> torch.Tensor:
    """One block's logits ``qs @ kj.T + bias`` in ``_acc`` precision, ``qs`` being the block's rows already
    multiplied by the scale (a ``(tile, D)`` product instead of a ``(tile, tile)`` one)."""
    out = qs @ kj.to(qs.dtype).T
    return out.add_(bias) if bias else out


def _backward_blocks(q, k, scale: float, bias: float, tile: int, block_grad, need_bias: bool):
    """Walk the logits ``scale * q @ k.T + bias`` in blocks again and accumulate the gradients of ``q``, ``k``,
    ``scale`` and ``bias`` from ``block_grad(I, J, logits)``: the loss's gradient with respect to the logits of
    block ``(I, J)`` (it may overwrite ``logits``).

    The scale's gradient ``sum_ij g_ij * q_i . k_j`` is taken as ``sum_i q_i . (g @ k)_i`` from the product the
    gradient of ``q`` needs anyway, so no second ``(tile, tile)`` pass is spent on it."""
    acc = _acc(q)
    grad_q = torch.zeros(q.shape, device=q.device, dtype=acc)
    grad_k = torch.zeros(k.shape, device=k.device, dtype=acc)
    grad_scale = torch.zeros((), device=q.device, dtype=acc)
    grad_bias = torch.zeros((), device=q.device, dtype=acc)
    for I in _blocks(q.shape[0], tile):
        qi = q[I].to(acc)
        qs = qi * scale
        for J in _blocks(k.shape[0], tile):
            kj = k[J].to(acc)
            g = block_grad(I, J, _logits(qs, kj, bias))  # (tile_r, tile_c)
            gk = g @ kj
            grad_scale += torch.vdot(qi.flatten(), gk.flatten())
            grad_q[I].add_(gk, alpha=scale)
            grad_k[J].addmm_(g.T, qi, alpha=scale)
            if need_bias:
                grad_bias += g.sum()
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_scale, grad_bias


def _scalar(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on ``like``'s device; a float becomes ``_acc(like)``, a tensor keeps its dtype (and graph)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device).reshape(())
    return torch.tensor(float(value), device=like.device, dtype=_acc(like))


def check_tile(tile: int) -> int:
    """``tile`` if it is a positive integer; ``ValueError`` naming it otherwise."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"the loss tile size must be a positive integer (e.g. 4096), got {tile!r}")
    return tile


class _TiledInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, q_groups, k_groups, tile, columns):
        R, C = q.shape[0], k.shape[0]
        dev, acc = q.device, _acc(q)
        row_lse = torch.full((R,), float("-inf"), device=dev, dtype=acc)
        row_pos = torch.zeros(R, device=dev, dtype=acc)  # sum of positive logits per row
        row_cnt = torch.zeros(R, device=dev, dtype=acc)
        col_lse = torch.full((C,), float("-inf"), device=dev, dtype=acc)
        col_pos = torch.zeros(C, device=dev, dtype=acc)
        col_cnt = torch.zeros(C, device=dev, dtype=acc)
        a = float(scale)
        for I in _blocks(R, tile):
            qs = q[I].to(acc) * a
            for J in _blocks(C, tile):
                s = _logits(qs, k[J], 0.0)  # (tile_r, tile_c)
                row_lse[I] = torch.logaddexp(row_lse[I], s.logsumexp(dim=1))
                if columns:
                    col_lse[J] = torch.logaddexp(col_lse[J], s.logsumexp(dim=0))
                pos = _positive(q_groups, k_groups, I, J)
                if pos is None:
                    continue
                s_pos = s.masked_fill_(~pos, 0.0)
                row_pos[I] += s_pos.sum(dim=1)
                row_cnt[I] += pos.sum(dim=1)
                if columns:
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
        acc = _acc(q)
        w_row = float(grad_row) / q.shape[0]
        w_col = float(grad_col) / max(ctx.n_valid, 1)
        valid = k_groups >= 0

        def block_grad(I, J, s):  # d loss / d logits of one block
            g = torch.exp(s - row_lse[I, None]).mul_(w_row)
            if ctx.columns:
                col = torch.exp(s.sub_(col_lse[None, J])).mul_(w_col)
                g += col.masked_fill_(~valid[None, J], 0.0) if not bool(valid[J].all()) else col
            pos = _positive(q_groups, k_groups, I, J)
            if pos is not None:
                pos = pos.to(acc)
                g -= pos * (w_row / row_cnt[I, None])
                if ctx.columns:
                    g -= pos * (w_col / col_cnt[None, J].clamp(min=1))
            return g

        grad_q, grad_k, grad_scale, _ = _backward_blocks(q, k, float(scale), 0.0, ctx.tile, block_grad, False)
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
    scale = _scalar(scale, q)
    return _TiledInfoNCE.apply(q, k, scale, q_groups, k_groups, tile, columns)


class _TiledSigmoid(torch.autograd.Function):
    # -log sigmoid(z l) with z = +1 on positives and -1 elsewhere is softplus(l) - [positive] * l, and its
    # derivative is sigmoid(l) - [positive]: the dense part of a block is one softplus (one sigmoid in the
    # backward pass), and only blocks that hold positives pay for a mask.
    @staticmethod
    def forward(ctx, q, k, scale, bias, q_groups, k_groups, tile):
        acc = _acc(q)
        total = torch.zeros((), device=q.device, dtype=acc)
        a, b = float(scale), float(bias)
        for I in _blocks(q.shape[0], tile):
            qs = q[I].to(acc) * a
            for J in _blocks(k.shape[0], tile):
                logits = _logits(qs, k[J], b)  # (tile_r, tile_c)
                total += torch.nn.functional.softplus(logits).sum()
                pos = _positive(q_groups, k_groups, I, J)
                if pos is not None:
                    total -= logits[pos].sum()
        ctx.save_for_backward(q, k, scale, bias, q_groups, k_groups)
        ctx.tile = tile
        return total / q.shape[0]

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, bias, q_groups, k_groups = ctx.saved_tensors
        weight = float(grad) / q.shape[0]

        def block_grad(I, J, logits):
            g = torch.sigmoid_(logits)
            pos = _positive(q_groups, k_groups, I, J)
            if pos is not None:
                g -= pos.to(g.dtype)
            return g.mul_(weight)

        grad_q, grad_k, grad_scale, grad_bias = _backward_blocks(
            q, k, float(scale), float(bias), ctx.tile, block_grad, ctx.needs_input_grad[3]
        )
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
    scale, bias = _scalar(scale, q), _scalar(bias, q)
    return _TiledSigmoid.apply(q, k, scale, bias, q_groups, k_groups, tile)
