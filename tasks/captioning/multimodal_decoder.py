"""CoCa's multimodal text decoder, which reads a text tower's token states rather than token ids.

In CoCa (https://arxiv.org/abs/2205.01917) the text tower is the lower half of the caption decoder: its
causal blocks embed the caption, and the class token it appends gives the contrastive text embedding.
``MultimodalTextDecoder`` is the upper half. Each of its layers is a causal self-attention block over the
text tower's states (``TextTransformer.forward_hidden``, before the tower's final norm), then a
cross-attention block over the image tokens (``VisionTransformer.pool_with_tokens``: the outputs of
CoCa's attentional pooler), and a final norm and a linear head give the vocabulary logits.

``TextTowerDecoder`` joins the decoder to its text tower: ids in, logits out, through the interface the
generation functions drive. Its cache keeps the decoder's keys and values and the image's, as
``CaptionDecoder``'s does. The text tower has no key/value cache, so it reads the whole prefix again at
each step, as open_clip's CoCa does; being causal, it gives the same states to the positions already fed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...encoders.attention import Block, CrossAttentionBlock, KeyValue
from ...encoders.layers import check_input, get_act_layer, get_norm_layer
from .decoder import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID, DecoderCache, caption_target_mask, used_target_length


class MultimodalDecoderLayer(nn.Module):
    """A causal self-attention block over the text states, then a cross-attention block over the image tokens."""

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
        self.self_block = Block(
            dim, num_heads, mlp_ratio, qkv_bias, act_layer, norm_layer, drop=drop, attn_drop=attn_drop, **factory
        )
        self.cross_block = CrossAttentionBlock(
            dim, num_heads, mlp_ratio, qkv_bias, act_layer, norm_layer, drop, attn_drop, **factory
        )

    def forward(
        self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, past: KeyValue | None = None
    ) -> tuple[torch.Tensor, KeyValue]:
        x, kv = self.self_block.forward_cached(x, past)
        return self.cross_block.forward_keys_values(x, cross_k, cross_v), kv


class MultimodalTextDecoder(nn.Module):
    """Text tower states and image tokens to next-token logits (CoCa's multimodal decoder, open_clip's layout).

    Args:
        vocab_size: number of token ids; the head scores every one of them.
        context_length: most text positions the decoder reads.
        width: width of the text states, of the image tokens and inside the decoder.
        layers: number of layers, each a self-attention and a cross-attention block.
        heads: attention heads per block.
        mlp_ratio: hidden size of the feed-forward networks relative to ``width``.
        memory_dim: width of the image tokens; it must equal ``width`` (``None``: ``width``), as the
            cross-attention reads them unprojected.
        qkv_bias: bias in the attention projections.
        act_layer: activation name or module class.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)``.
        norm_eps: epsilon of the normalisation layers.
        drop: dropout after attention and MLP.
        attn_drop: dropout on attention weights.
        bos_token_id: the token every caption starts with (the tokenizer's start-of-text).
        eos_token_id: the token that ends a caption (the tokenizer's end-of-text).
        pad_token_id: the id after the end of a caption.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 76,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        memory_dim: int | None = None,
        qkv_bias: bool = True,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: str | Callable[[int], nn.Module] = "layernorm",
        norm_eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        bos_token_id: int = CLIP_BOS_ID,
        eos_token_id: int = CLIP_EOS_ID,
        pad_token_id: int = CLIP_PAD_ID,
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
        if memory_dim is not None and memory_dim != width:
            raise ValueError(
                f"MultimodalTextDecoder cross-attends to image tokens of its own width {width}; got memory_dim="
                f"{memory_dim} (give the image tower a pooled width of {width})"
            )
        self.vocab_size = self.num_tokens = vocab_size
        self.context_length = context_length
        self.width = self.memory_dim = width
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.grad_checkpointing = False
        factory = {"device": device, "dtype": dtype}
        norm, act = get_norm_layer(norm_layer, norm_eps), get_act_layer(act_layer)
        self.layers = nn.ModuleList(
            MultimodalDecoderLayer(width, heads, mlp_ratio, qkv_bias, act, norm, drop, attn_drop, **factory)
            for _ in range(layers)
        )
        self.norm = norm(width).to(**factory)
        self.head = nn.Linear(width, vocab_size, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * max(len(self.layers), 1)) ** -0.5  # residual outputs start small
        for name, module in self.layers.named_modules():
            if isinstance(module, nn.Linear):
                std = proj_std if name.endswith(("proj", "fc2")) else attn_std
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.head.weight, std=attn_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ pieces

    def _check_states(self, states: torch.Tensor, start: int = 0) -> None:
        name = type(self).__name__
        expected = f"(B, T, {self.width}) text tower states"
        check_input(states, name=name, ndim=3, expected=expected, dim_sizes={2: self.width})
        if start + states.shape[1] > self.context_length:
            raise ValueError(
                f"{name} covers {self.context_length} positions, got {states.shape[1]} states"
                + (f" after {start} cached ones" if start else "")
            )

    def _check_memory(self, image_tokens: torch.Tensor) -> None:
        expected = f"(B, N, {self.memory_dim}) image tokens"
        check_input(image_tokens, name=type(self).__name__, ndim=3, expected=expected, dim_sizes={2: self.memory_dim})

    def cross_keys_values(self, image_tokens: torch.Tensor) -> list[KeyValue]:
        """Each layer's cross-attention keys and values of ``image_tokens (B, N, width)``."""
        self._check_memory(image_tokens)
        return [layer.cross_block.context_keys_values(image_tokens) for layer in self.layers]

    def _run(
        self, states: torch.Tensor, cross_kv: list[KeyValue], past: list[KeyValue | None]
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        x, new = states, []
        for layer, (k, v), kv in zip(self.layers, cross_kv, past):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv is None:
                x, kv = checkpoint(layer, x, k, v, None, use_reentrant=False)
            else:
                x, kv = layer(x, k, v, kv)
            new.append(kv)
        return self.norm(x), new

    # ------------------------------------------------------------------ whole sequences

    def forward_hidden(self, states: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, T, width)`` of the text ``states (B, T, width)`` over the image tokens."""
        self._check_states(states)
        if image_tokens.shape[0] != states.shape[0]:
            raise ValueError(f"{states.shape[0]} text rows but {image_tokens.shape[0]} images")
        hidden, _ = self._run(states, self.cross_keys_values(image_tokens), [None] * len(self.layers))
        return hidden

    def forward(self, states: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)``: row ``t`` predicts the token after text position ``t``."""
        return self.head(self.forward_hidden(states, image_tokens))

    def teacher_forcing(
        self, text: torch.Tensor, states: torch.Tensor, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of every position that predicts a caption token, for the captioning loss.

        The decoder reads the text tower's states at ``text[:, :-1]`` and predicts ``text[:, 1:]``; as in
        ``CaptionDecoder.teacher_forcing``, positions after a row's first end-of-text token are left out
        and the decoder runs only up to the batch's longest caption.

        Args:
            text: ``(B, L)`` the token ids the text tower read.
            states: ``(B, L', width)`` its ``forward_hidden`` states, ``L' >= L - 1`` (a class token after
                the text is not read).
            image_tokens: ``(B, N, width)``.

        Returns:
            ``(logits (M, vocab_size), targets (M,))`` for the ``M`` kept positions, in row-major order.
        """
        check_input(text, name=type(self).__name__, ndim=2, expected="(B, L) token ids", floating=False)
        if text.shape[1] < 2:
            raise ValueError(
                f"captions need at least 2 tokens (start-of-text and one more), got shape {tuple(text.shape)}"
            )
        if states.shape[:1] != text.shape[:1] or states.ndim != 3 or states.shape[1] < text.shape[1] - 1:
            raise ValueError(
                f"expected the text tower's states of these {text.shape[0]} texts, (B, >= {text.shape[1] - 1}, "
                f"width); got shape {tuple(states.shape)}"
            )
        keep = caption_target_mask(text, self.eos_token_id, self.pad_token_id)  # (B, L - 1)
        used = used_target_length(keep)
        keep = keep[:, :used]
        targets = text[:, 1 : used + 1][keep]
        hidden = self.forward_hidden(states[:, :used], image_tokens)  # (B, used, width)
        return self.head(hidden[keep]), targets

    # ------------------------------------------------------------------ step by step

    def init_cache(self, image_tokens: torch.Tensor) -> DecoderCache:
        """An empty cache holding the cross-attention keys and values of ``image_tokens (B, N, width)``."""
        return DecoderCache([None] * len(self.layers), self.cross_keys_values(image_tokens))

    def step(self, states: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Feed text ``states (B, T, width)`` after the cached positions; returns logits ``(B, T, vocab_size)``.

        ``cache`` is updated in place to cover the new positions too.
        """
        self._check_states(states, cache.length)
        if states.shape[0] != cache.cross_kv[0][0].shape[0]:
            raise ValueError(f"{states.shape[0]} text rows but the cache holds {cache.cross_kv[0][0].shape[0]}")
        hidden, cache.self_kv = self._run(states, cache.cross_kv, cache.self_kv)
        return self.head(hidden)


def check_text_tower(text_encoder: nn.Module | None, decoder: MultimodalTextDecoder) -> None:
    """``ValueError`` unless ``text_encoder`` is a causal text tower whose states ``decoder`` can read."""
    if text_encoder is None:
        raise ValueError("a MultimodalTextDecoder reads the text tower's states; give a text encoder")
    if not getattr(text_encoder, "causal", False) or not hasattr(text_encoder, "forward_hidden"):
        causal = " that is not causal" if hasattr(text_encoder, "forward_hidden") else ""
        raise ValueError(
            "a MultimodalTextDecoder reads a causal TextTransformer's states (its forward_hidden); "
            f"got a {type(text_encoder).__name__}{causal}"
        )
    if text_encoder.width != decoder.width:
        raise ValueError(
            f"the text tower is {text_encoder.width} wide but the MultimodalTextDecoder reads {decoder.width}"
        )


@dataclass
class TextTowerCache:
    """What ``TextTowerDecoder`` keeps between generation steps.

    Attributes:
        ids: ``(B, T)`` the token ids fed so far, which the text tower reads again at each step.
        decoder: the multimodal decoder's own key/value cache.
    """

    ids: torch.Tensor
    decoder: DecoderCache

    @property
    def length(self) -> int:
        """How many positions have been fed."""
        return self.ids.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (e.g. the parents of the surviving beams), in that order, in place."""
        self.ids = self.ids[index]
        self.decoder.reorder(index)


class TextTowerDecoder:
    """A ``MultimodalTextDecoder`` read through its text tower: token ids in, next-token logits out.

    It offers what the generation functions use of a ``CaptionDecoder``: the special token ids,
    ``context_length``, ``num_tokens``, ``to_ids`` / ``to_columns``, a call on whole sequences, and
    ``init_cache`` / ``step``. It holds the two modules, it does not own them (they are the model's).

    Args:
        text_encoder: a causal ``TextTransformer`` of the decoder's width.
        decoder: the multimodal text decoder.
    """

    def __init__(self, text_encoder: nn.Module, decoder: MultimodalTextDecoder) -> None:
        check_text_tower(text_encoder, decoder)
        self.text_encoder, self.decoder = text_encoder, decoder
        self.bos_token_id, self.eos_token_id = decoder.bos_token_id, decoder.eos_token_id
        self.pad_token_id, self.num_tokens = decoder.pad_token_id, decoder.num_tokens
        self.context_length = min(decoder.context_length, text_encoder.context_length)

    def to_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """The tokenizer id of each output column: the column itself (the head scores every id)."""
        return columns

    def to_columns(self, ids: torch.Tensor) -> torch.Tensor:
        """The output column of each tokenizer id: the id itself."""
        return ids

    def _check_memory(self, image_tokens: torch.Tensor) -> None:
        self.decoder._check_memory(image_tokens)

    def states(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower's states ``(B, T, width)`` at the positions of ``ids (B, T)`` (its class token left out)."""
        return self.text_encoder.forward_hidden(ids)[:, : ids.shape[1]]

    def __call__(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)`` of ``ids (B, T)``: row ``t`` predicts token ``t + 1``."""
        return self.decoder(self.states(ids), image_tokens)

    def init_cache(self, image_tokens: torch.Tensor) -> TextTowerCache:
        """An empty cache holding the cross-attention keys and values of ``image_tokens (B, N, width)``."""
        ids = torch.zeros(image_tokens.shape[0], 0, dtype=torch.long, device=image_tokens.device)
        return TextTowerCache(ids, self.decoder.init_cache(image_tokens))

    def step(self, ids: torch.Tensor, cache: TextTowerCache) -> torch.Tensor:
        """Feed ``ids (B, T)`` after the cached positions; returns logits ``(B, T, vocab_size)``, updating ``cache``."""
        T = ids.shape[1]
        cache.ids = torch.cat([cache.ids, ids], dim=1)  # (B, P + T)
        # causal: the tower's states at the P earlier positions are those the decoder's cache already holds
        return self.decoder.step(self.states(cache.ids)[:, -T:], cache.decoder)
