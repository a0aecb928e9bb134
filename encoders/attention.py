"""Attention, the MLP and the transformer blocks: the one home of attention in polymodal.

Every attention in the project is this ``Attention``: the encoders' self-attention, the fusion's
cross-attention, the caption decoder's cached self-attention and its cross-attention to image tokens,
and CLIP's ResNet attention pool. Projections are plain ``nn.Linear`` (fused qkv for self-attention, q
and a fused kv for cross-attention) so adapters can wrap them and checkpoints map onto them one to one;
the product goes through ``F.scaled_dot_product_attention``, so each call runs the fastest kernel
available on CPU and CUDA and exports with ``torch.export``.

SDPA never materialises the attention probabilities. Explanations that need them (attention rollout)
ask for them with ``record_attention``: inside that block the chosen attentions compute the
probabilities themselves (``attention_weights``) and keep them; outside it nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

KeyValue = tuple[torch.Tensor, torch.Tensor]


def mlp_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """The hidden width of every block's MLP.

    Rounded rather than truncated: a ratio read back from a checkpoint (``hidden / dim``, a float
    such as 3.7362) must give the checkpoint's hidden width again, which truncation can miss by one.
    """
    return round(dim * mlp_ratio)


class Attention(nn.Module):
    """Multi-head attention: self-attention over ``x``, or with ``cross=True`` queries of ``x`` over a context.

    Masks are boolean (True = attend) and broadcast to ``(B, heads, N, M)``; a key padding mask
    ``(B, M)`` becomes ``mask[:, None, None, :]``.

    Args:
        dim: token width (of queries, keys and values alike).
        num_heads: attention heads; ``dim`` must divide by it.
        qkv_bias: bias in the query, key and value projections.
        attn_drop: dropout on the attention weights in training.
        proj_drop: dropout after the output projection.
        cross: separate query (``q``) and fused key/value (``kv``) projections instead of one fused ``qkv``.
        out_dim: width of the output projection; ``None`` keeps ``dim``.
        head_dim: width of each head; ``None`` is ``dim // num_heads``. A structurally pruned block keeps
            its heads' width with fewer heads, so its attention runs ``num_heads * head_dim < dim`` wide.
        context_dim: with ``cross=True``, width of the context the keys and values are projected from;
            ``None`` is ``dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cross: bool = False,
        out_dim: int | None = None,
        head_dim: int | None = None,
        context_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if context_dim is not None and not cross:
            raise ValueError(f"context_dim={context_dim} applies to cross-attention only (cross=True)")
        if num_heads < 1:
            raise ValueError(f"attention needs at least one head, got num_heads={num_heads}")
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"width {dim} must be divisible by the number of heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else dim // num_heads
        self.inner_dim = self.num_heads * self.head_dim  # == dim unless heads were pruned
        self.cross = cross
        inner = self.inner_dim
        if cross:
            self.q = nn.Linear(dim, inner, bias=qkv_bias, **factory)
            self.kv = nn.Linear(context_dim or dim, inner * 2, bias=qkv_bias, **factory)
        else:
            self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias, **factory)
        self.proj = nn.Linear(inner, out_dim or dim, **factory)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self._recording: list[torch.Tensor] | None = None  # set by record_attention only

    def _split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        B, N, _ = x.shape
        x = x.view(B, N, parts, self.num_heads, self.head_dim)
        return x.permute(2, 0, 3, 1, 4).unbind(0)  # parts x (B, heads, N, head_dim)

    def _slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.qkv.bias[start:stop] if self.qkv.bias is not None else None
        return self.qkv.weight[start:stop], bias

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries ``(B, heads, N, head_dim)`` of ``x (B, N, dim)``, alone (e.g. of a few positions only)."""
        q = self.q(x) if self.cross else F.linear(x, *self._slice(0, self.inner_dim))
        return self._split_heads(q, 1)[0]

    def keys_values(self, source: torch.Tensor) -> KeyValue:
        """Keys and values ``2 x (B, heads, M, head_dim)`` of ``source (B, M, context_dim)``, e.g. to compute once
        and reuse."""
        kv = self.kv(source) if self.cross else F.linear(source, *self._slice(self.inner_dim, 3 * self.inner_dim))
        k, v = self._split_heads(kv, 2)
        return k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention of heads ``q (B, heads, N, head_dim)`` over ``k, v``, merged and projected: ``(B, N, out_dim)``."""
        dropout = self.attn_drop if self.training else 0.0
        if self._recording is not None:
            # The explicit product, so that the weights kept are the ones the output was computed from
            # (and a gradient through them reaches the output).
            weights = attention_weights(q, k, attn_mask, is_causal)  # (B, heads, N, M)
            self._recording.append(weights)
            x = F.dropout(weights, dropout, self.training) @ v  # (B, heads, N, head_dim)
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None, dropout_p=dropout
            )  # (B, heads, N, head_dim)
        B, _, N, _ = x.shape
        x = x.transpose(1, 2).reshape(B, N, self.inner_dim)  # (B, N, heads * head_dim)
        return self.proj_drop(self.proj(x))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attend ``x (B, N, dim)`` over itself, or over ``context (B, M, context_dim)`` for cross-attention."""
        if self.cross != (context is not None):
            kind = "cross-attention needs" if self.cross else "self-attention takes no"
            raise ValueError(f"{type(self).__name__}: {kind} context")
        if self.cross:
            q, (k, v) = self.queries(x), self.keys_values(context)
        else:
            q, k, v = self._split_heads(self.qkv(x), 3)  # one matmul for all three
        return self.attend(q, k, v, attn_mask, is_causal)

    def forward_cached(self, x: torch.Tensor, past: KeyValue | None = None) -> tuple[torch.Tensor, KeyValue]:
        """Causal self-attention of ``x (B, T, dim)`` placed after the ``P`` positions cached in ``past``.

        Returns the output ``(B, T, out_dim)`` and the keys and values of all ``P + T`` positions, the
        cache for the next step of incremental decoding.
        """
        if self.cross:
            raise ValueError(f"{type(self).__name__}: a key/value cache extends self-attention only")
        q, k, v = self._split_heads(self.qkv(x), 3)  # 3 x (B, heads, T, head_dim)
        mask, causal = None, True
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, heads, P + T, head_dim)
            v = torch.cat([past[1], v], dim=2)
            P, T = past[0].shape[2], x.shape[1]
            causal = False  # SDPA's is_causal aligns the diagonal top-left, which is wrong with a cache
            if T > 1:  # query i sits at position P + i and sees keys 0 .. P + i
                mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        return self.attend(q, k, v, mask, causal), (k, v)


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """The probabilities ``softmax(q k^T / sqrt(head_dim))`` ``(B, heads, N, M)`` that SDPA weighs values by.

    Masks as ``F.scaled_dot_product_attention`` reads them: a boolean ``attn_mask`` (True = attend) or a
    float one added to the scores, broadcast to ``(B, heads, N, M)``; ``is_causal`` (without a mask) lets
    query ``i`` see keys ``0 .. i``. A query that may attend to nothing gets all-zero weights, as SDPA
    gives it a zero output.
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, N, M)
    if is_causal and attn_mask is None:
        N, M = scores.shape[-2:]
        attn_mask = torch.ones(N, M, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    return weights.masked_fill(weights.isnan(), 0.0)  # rows of -inf only: nothing to attend to


@contextlib.contextmanager
def record_attention(module: nn.Module, names: Iterable[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Keep the attention probabilities of every ``Attention`` in ``module`` (or of those ``names``) for a block.

    Yields a dict from each attention's name in ``module.named_modules()`` (e.g.
    ``"transformer.blocks.0.attn"``; ``""`` for ``module`` itself), in module order, to the list of its
    weights ``(B, heads, N, M)``, one per call, in call order. Inside the block those attentions compute the
    weights explicitly (``attention_weights``) and their outputs from them, equal to the SDPA path up to
    rounding; the weights stay in the autograd graph. On exit the lists stop growing and every attention
    is back on SDPA. Run the model in eval mode: attention dropout and gradient checkpointing's recomputed
    forward would otherwise make the records differ from what the output used, or double them.

    Args:
        module: a model, tower or block holding ``Attention`` modules.
        names: only these (names as above); ``None`` records all.

    Raises:
        ValueError: ``module`` holds no ``Attention``, a name is not one of them, or one is already being recorded.
    """
    found = {name: m for name, m in module.named_modules() if isinstance(m, Attention)}
    if not found:
        raise ValueError(f"{type(module).__name__} holds no Attention module to record")
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"no Attention named {unknown} in {type(module).__name__}; it has {list(found)}")
        found = {n: m for n, m in found.items() if n in names}
    busy = [n for n, m in found.items() if m._recording is not None]
    if busy:
        raise ValueError(f"attention {busy} is already being recorded; leave that record_attention block first")
    records: dict[str, list[torch.Tensor]] = {name: [] for name in found}
    try:
        for name, m in found.items():
            m._recording = records[name]
        yield records
    finally:
        for m in found.values():
            m._recording = None


class Mlp(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm self-attention block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``head_dim`` and ``mlp_dim`` override the widths that ``dim / num_heads`` and ``mlp_ratio`` give,
    for blocks with pruned heads or MLP units.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ls_init_value: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim).to(**factory)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, head_dim=head_dim, **factory
        )
        self.ls1 = LayerScale(dim, ls_init_value, **factory) if ls_init_value else nn.Identity()
        self.norm2 = norm_layer(dim).to(**factory)
        hidden = mlp_dim if mlp_dim is not None else mlp_hidden_dim(dim, mlp_ratio)
        self.mlp = Mlp(dim, hidden, act_layer=act_layer, drop=drop, **factory)
        self.ls2 = LayerScale(dim, ls_init_value, **factory) if ls_init_value else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_cached(self, x: torch.Tensor, past: KeyValue | None = None) -> tuple[torch.Tensor, KeyValue]:
        """The causal ``forward`` of ``x (B, T, dim)`` placed after the positions cached in ``past``; returns the
        output and the keys and values of every position so far (see ``Attention.forward_cached``)."""
        attn, kv = self.attn.forward_cached(self.norm1(x), past)
        x = x + self.ls1(attn)
        return x + self.ls2(self.mlp(self.norm2(x))), kv


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: ``x + attn(norm_q(x), norm_kv(context))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_q = norm_layer(dim).to(**factory)
        self.norm_kv = norm_layer(dim).to(**factory)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, cross=True, **factory)
        self.norm2 = norm_layer(dim).to(**factory)
        self.mlp = Mlp(dim, mlp_hidden_dim(dim, mlp_ratio), act_layer=act_layer, drop=drop, **factory)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x (B, N, dim)`` over ``context (B, M, dim)``; ``key_padding_mask (B, M)``: True = attend."""
        mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None  # (B, 1, 1, M)
        return self.forward_keys_values(x, *self.context_keys_values(context), attn_mask=mask)

    def context_keys_values(self, context: torch.Tensor) -> KeyValue:
        """Keys and values ``2 x (B, heads, M, head_dim)`` of ``context (B, M, dim)``, to compute once and reuse
        (e.g. over the image tokens, at every step of caption generation)."""
        return self.attn.keys_values(self.norm_kv(context))

    def forward_keys_values(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``forward`` of ``x (B, N, dim)`` over a context whose keys and values ``context_keys_values`` gave."""
        x = x + self.attn.attend(self.attn.queries(self.norm_q(x)), k, v, attn_mask)
        return x + self.mlp(self.norm2(x))


def check_block_widths(
    layers: int, heads: int, block_heads: list[int] | None, block_mlp_dims: list[int] | None
) -> None:
    """``ValueError`` unless per-block widths list one value per block, heads within ``1 .. heads``."""
    for name, values in (("block_heads", block_heads), ("block_mlp_dims", block_mlp_dims)):
        if values is not None and len(values) != layers:
            raise ValueError(f"{name} must list one value per block ({layers}), got {len(values)}: {values}")
    if block_heads is not None and not all(1 <= h <= heads for h in block_heads):
        raise ValueError(f"block_heads must each be between 1 and heads={heads}, got {block_heads}")
    if block_mlp_dims is not None and not all(d >= 1 for d in block_mlp_dims):
        raise ValueError(f"block_mlp_dims must each be at least 1, got {block_mlp_dims}")


class Transformer(nn.Module):
    """A stack of pre-norm self-attention blocks with optional gradient checkpointing.

    Every block has ``heads`` heads of width ``width // heads`` and an MLP ``mlp_ratio`` times as wide,
    unless ``block_heads`` / ``block_mlp_dims`` give each block's own count of heads (of that same
    width) and MLP hidden units: what structured pruning leaves.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ls_init_value: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        block_heads: list[int] | None = None,
        block_mlp_dims: list[int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        check_block_widths(layers, heads, block_heads, block_mlp_dims)
        self.width = width
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            Block(
                width,
                block_heads[i] if block_heads is not None else heads,
                mlp_ratio,
                qkv_bias,
                act_layer,
                norm_layer,
                ls_init_value,
                drop,
                attn_drop,
                head_dim=width // heads,
                mlp_dim=block_mlp_dims[i] if block_mlp_dims is not None else None,
                device=device,
                dtype=dtype,
            )
            for i in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


def init_transformer_(transformer: Transformer) -> None:
    """CLIP-style initialisation: residual projections scaled down with depth."""
    width, layers = transformer.width, max(len(transformer.blocks), 1)
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
