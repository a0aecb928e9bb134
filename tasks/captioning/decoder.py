"""The caption decoder: a causal transformer over caption tokens that cross-attends to image tokens.

Each block is pre-norm: causal self-attention over the caption so far, cross-attention to the image
tokens (an encoder's ``forward_features``, projected to the decoder width), then an MLP. Training uses
teacher forcing: the decoder reads ``text[:, :-1]`` and predicts ``text[:, 1:]``, and only positions up
to the end-of-text token count. For generation, a ``DecoderCache`` keeps each layer's self-attention
keys and values (one position longer per step) and the cross-attention keys and values of the image
tokens (computed once), so each step feeds one token. Both attentions are ``encoders.attention.Attention``
(its key/value cache, and its split query and key/value projections for the image tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...encoders.attention import Attention, KeyValue, Mlp, mlp_hidden_dim
from ...encoders.layers import check_input, get_act_layer, get_norm_layer

# The CLIP tokenizer's special ids: start-of-text, end-of-text and padding.
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_PAD_ID = 0


@dataclass
class DecoderCache:
    """Keys and values kept between generation steps, one entry per decoder layer.

    Attributes:
        self_kv: causal self-attention keys and values, each ``(B, heads, T, head_dim)`` for the ``T``
            positions fed so far.
        cross_kv: cross-attention keys and values of the image tokens, each ``(B, heads, N, head_dim)``.
    """

    self_kv: list[KeyValue | None]
    cross_kv: list[KeyValue]

    @property
    def length(self) -> int:
        """How many positions have been fed."""
        first = self.self_kv[0] if self.self_kv else None
        return 0 if first is None else first[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (e.g. the parents of the surviving beams), in that order, in place."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]


class CaptionDecoderBlock(nn.Module):
    """``x + self_attn(norm1(x))``, then ``x + cross_attn(norm2(x), image)``, then ``x + mlp(norm3(x))``."""

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
        self.norm1 = norm_layer(dim).to(**factory)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, **factory)
        self.norm2 = norm_layer(dim).to(**factory)
        self.cross_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, cross=True, **factory)
        self.norm3 = norm_layer(dim).to(**factory)
        self.mlp = Mlp(dim, mlp_hidden_dim(dim, mlp_ratio), act_layer=act_layer, drop=drop, **factory)

    def forward(
        self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, past: KeyValue | None = None
    ) -> tuple[torch.Tensor, KeyValue]:
        attn, kv = self.attn.forward_cached(self.norm1(x), past)
        x = x + attn
        x = x + self.cross_attn.attend(self.cross_attn.queries(self.norm2(x)), cross_k, cross_v)
        return x + self.mlp(self.norm3(x)), kv


class CaptionDecoder(nn.Module):
    """Transformer decoder from image tokens to caption token logits.

    Args:
        vocab_size: number of token ids (49408 for the CLIP tokenizer).
        context_length: longest token sequence (start-of-text included) the positional table covers.
        width: token size inside the decoder.
        layers: number of decoder blocks.
        heads: attention heads per block.
        mlp_ratio: hidden size of the feed-forward networks relative to ``width``.
        memory_dim: width of the image tokens; they are linearly projected when it differs from
            ``width`` (``None``: the same as ``width``).
        tie_embeddings: the output layer reuses the token embedding matrix (no separate head).
        qkv_bias: bias in the attention projections.
        act_layer: activation name or module class.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)``.
        norm_eps: epsilon of the normalisation layers.
        drop: dropout after attention and MLP.
        attn_drop: dropout on attention weights.
        bos_token_id: the token every caption starts with (the tokenizer's start-of-text).
        eos_token_id: the token that ends a caption (the tokenizer's end-of-text).
        pad_token_id: the id after the end of a caption.
        token_ids: the tokenizer ids the decoder reads and writes, in the order of its output columns
            (``None``: all ``vocab_size`` ids). A short list, such as the tokens of a data set's
            captions, makes the embedding and the output layer, which dominate the cost of a small
            decoder with a 49408-token vocabulary, many times smaller. It must hold the start- and
            end-of-text ids.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 32,
        width: int = 512,
        layers: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        memory_dim: int | None = None,
        tie_embeddings: bool = True,
        qkv_bias: bool = True,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: str | Callable[[int], nn.Module] = "layernorm",
        norm_eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        bos_token_id: int = CLIP_BOS_ID,
        eos_token_id: int = CLIP_EOS_ID,
        pad_token_id: int = CLIP_PAD_ID,
        token_ids: Sequence[int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
        if bos_token_id == eos_token_id:
            raise ValueError(f"bos_token_id and eos_token_id must differ, both are {bos_token_id}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start token and one more), got {context_length}")
        if token_ids is not None:
            token_ids = [int(i) for i in token_ids]
            outside = sorted({i for i in token_ids if not 0 <= i < vocab_size})
            if outside:
                raise ValueError(f"token_ids {outside[:10]} are outside the vocabulary [0, {vocab_size})")
            if len(set(token_ids)) != len(token_ids):
                raise ValueError("token_ids must not repeat an id")
            missing = [i for i in (bos_token_id, eos_token_id) if i not in token_ids]
            if missing:
                raise ValueError(f"token_ids must include the start- and end-of-text ids; {missing} are missing")
        self.token_ids = token_ids
        self.num_tokens = len(token_ids) if token_ids is not None else vocab_size
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.memory_dim = memory_dim if memory_dim is not None else width
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.grad_checkpointing = False
        factory = {"device": device, "dtype": dtype}
        norm = get_norm_layer(norm_layer, norm_eps)
        act = get_act_layer(act_layer)

        if token_ids is None:
            self.register_buffer("column_of_id", None, persistent=False)
            self.register_buffer("id_of_column", None, persistent=False)
        else:  # lookup tables between tokenizer ids and the decoder's rows / columns, -1 for ids it lacks
            columns = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
            columns[torch.tensor(token_ids, device=device)] = torch.arange(len(token_ids), device=device)
            self.register_buffer("column_of_id", columns, persistent=False)
            self.register_buffer(
                "id_of_column", torch.tensor(token_ids, dtype=torch.long, device=device), persistent=False
            )
        self.token_embedding = nn.Embedding(self.num_tokens, width, **factory)
        self.pos_embed = nn.Parameter(torch.empty(context_length, width, **factory))
        self.memory_proj = nn.Linear(self.memory_dim, width, **factory) if self.memory_dim != width else nn.Identity()
        self.memory_norm = norm(width).to(**factory)
        self.blocks = nn.ModuleList(
            CaptionDecoderBlock(width, heads, mlp_ratio, qkv_bias, act, norm, drop, attn_drop, **factory)
            for _ in range(layers)
        )
        self.norm = norm(width).to(**factory)
        self.lm_head = None if tie_embeddings else nn.Linear(width, self.num_tokens, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        proj_std = self.width**-0.5 * (2 * max(len(self.blocks), 1)) ** -0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                # residual outputs start small so the stack begins close to the identity
                std = proj_std if name.endswith(("proj", "fc2")) and "memory" not in name else self.width**-0.5
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ pieces

    def to_columns(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's row / output column of each tokenizer id (-1 for ids outside ``token_ids``)."""
        return ids if self.column_of_id is None else self.column_of_id[ids]

    def to_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """The tokenizer id of each output column (e.g. of an ``argmax`` over the logits)."""
        return columns if self.id_of_column is None else self.id_of_column[columns]

    def _check_in_vocabulary(self, ids: torch.Tensor) -> None:
        if self.column_of_id is None or ids.device.type != "cpu":
            return
        unknown = ids[self.column_of_id[ids] < 0]
        if unknown.numel():
            raise ValueError(
                f"token ids {sorted(set(unknown.tolist()))[:10]} are not in this decoder's vocabulary of "
                f"{self.num_tokens} tokens (its token_ids); build the decoder with them, or with token_ids=None"
            )

    def _check_tokens(self, tokens: torch.Tensor, start: int = 0, in_vocabulary: bool = True) -> None:
        name = type(self).__name__
        check_input(tokens, name=name, ndim=2, expected="(B, L) token ids", floating=False)
        if start + tokens.shape[1] > self.context_length:
            raise ValueError(
                f"{name} covers {self.context_length} positions, got {tokens.shape[1]} tokens"
                + (f" after {start} cached ones" if start else "")
            )
        if tokens.device.type == "cpu" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"{name} expects token ids in [0, {self.vocab_size}), "
                f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        if in_vocabulary:
            self._check_in_vocabulary(tokens)

    def _check_memory(self, image_tokens: torch.Tensor) -> None:
        check_input(
            image_tokens,
            name=type(self).__name__,
            ndim=3,
            expected=f"(B, N, {self.memory_dim}) image tokens",
            dim_sizes={2: self.memory_dim},
        )

    def project_memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, N, memory_dim)`` to the decoder width ``(B, N, width)``."""
        self._check_memory(image_tokens)
        return self.memory_norm(self.memory_proj(image_tokens))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(..., num_tokens)`` of final hidden states ``(..., width)``; column ``c`` scores
        tokenizer id ``to_ids(c)`` (``c`` itself without ``token_ids``)."""
        if self.lm_head is None:
            return F.linear(hidden, self.token_embedding.weight)
        return self.lm_head(hidden)

    def _run(
        self, tokens: torch.Tensor, cross_kv: list[KeyValue], past: list[KeyValue | None], start: int
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        T = tokens.shape[1]
        x = self.token_embedding(self.to_columns(tokens)) + self.pos_embed[start : start + T].to(
            self.token_embedding.weight.dtype
        )
        new = []
        for block, (ck, cv), kv in zip(self.blocks, cross_kv, past):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv is None:
                x, kv = checkpoint(block, x, ck, cv, None, use_reentrant=False)
            else:
                x, kv = block(x, ck, cv, kv)
            new.append(kv)
        return self.norm(x), new

    # ------------------------------------------------------------------ whole sequences

    def forward_hidden(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, L, width)`` of ``tokens (B, L)`` given the image tokens ``(B, N, memory_dim)``."""
        self._check_tokens(tokens)
        memory = self.project_memory(image_tokens)
        if memory.shape[0] != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows but {memory.shape[0]} images")
        cross_kv = [block.cross_attn.keys_values(memory) for block in self.blocks]
        hidden, _ = self._run(tokens, cross_kv, [None] * len(self.blocks), 0)
        return hidden

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, L, num_tokens)``: row ``t`` predicts token ``t + 1`` (see ``logits``)."""
        return self.logits(self.forward_hidden(tokens, image_tokens))

    def teacher_forcing(self, text: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of every position that predicts a caption token, for the captioning loss.

        The decoder reads ``text[:, :-1]`` and predicts ``text[:, 1:]``; positions after a row's first
        end-of-text token (the padding) are left out, as are padding ids in a row without one. The
        decoder runs only up to the batch's longest caption and the output layer only at the kept
        positions, which saves most of the work on padded rows.

        Args:
            text: ``(B, L)`` token ids that start with the start-of-text token, as the tokenizer makes them.
            image_tokens: ``(B, N, memory_dim)``.

        Returns:
            ``(logits (M, num_tokens), targets (M,))`` for the ``M`` kept positions, in row-major order;
            the targets are output columns (tokenizer ids unless the decoder has ``token_ids``).
        """
        self._check_tokens(text, in_vocabulary=False)
        if text.shape[1] < 2:
            raise ValueError(
                f"captions need at least 2 tokens (start-of-text and one more), got shape {tuple(text.shape)}"
            )
        keep = caption_target_mask(text, self.eos_token_id, self.pad_token_id)  # (B, L - 1)
        used = used_target_length(keep)
        keep = keep[:, :used]
        targets = text[:, 1 : used + 1][keep]
        self._check_in_vocabulary(targets)
        # inputs after a row's end of text never reach a kept position; the start token stands in for them
        in_caption = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1)  # (B, used)
        inputs = torch.where(in_caption, text[:, :used], self.bos_token_id)
        hidden = self.forward_hidden(inputs, image_tokens)  # (B, used, width)
        return self.logits(hidden[keep]), self.to_columns(targets)

    # ------------------------------------------------------------------ step by step

    def init_cache(self, image_tokens: torch.Tensor) -> DecoderCache:
        """An empty cache holding the cross-attention keys and values of ``image_tokens (B, N, memory_dim)``."""
        memory = self.project_memory(image_tokens)
        return DecoderCache([None] * len(self.blocks), [block.cross_attn.keys_values(memory) for block in self.blocks])

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Feed ``tokens (B, T)`` after the cached positions; returns logits ``(B, T, num_tokens)``.

        ``cache`` is updated in place to cover the new positions too.
        """
        start = cache.length
        self._check_tokens(tokens, start)
        if tokens.shape[0] != cache.cross_kv[0][0].shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows but the cache holds {cache.cross_kv[0][0].shape[0]}")
        hidden, cache.self_kv = self._run(tokens, cache.cross_kv, cache.self_kv, start)
        return self.logits(hidden)


def caption_target_mask(text: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Which targets ``text[:, 1:]`` are caption tokens: ``(B, L - 1)`` bool.

    A target counts up to and including the row's first end-of-text token. In a row without one
    (e.g. cut by hand), every non-padding target counts.
    """
    targets = text[:, 1:]
    is_eos = targets == eos_token_id
    before_eos = (is_eos.cumsum(dim=1) - is_eos.long()) == 0  # no end-of-text strictly before
    has_eos = is_eos.any(dim=1, keepdim=True)
    return before_eos & (has_eos | (targets != pad_token_id))


def used_target_length(keep: torch.Tensor) -> int:
    """How many leading positions of a ``caption_target_mask`` ``keep (B, L - 1)`` a causal decoder must run: up to
    the batch's last kept target, as later positions cannot change the kept ones (all of them when compiling)."""
    if torch.compiler.is_compiling() or not bool(keep.any()):
        return keep.shape[1]
    return int(keep.any(dim=0).nonzero().max()) + 1


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits (M, num_tokens)`` against ``targets (M,)`` (from ``teacher_forcing``)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"caption_loss expects logits (M, num_tokens) and targets (M,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        raise ValueError("caption_loss got no target tokens (are all captions empty?)")
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
