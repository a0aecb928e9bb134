"""CLIP-style causal text transformer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Transformer, init_transformer_
from .base import Encoder
from .layers import check_input, get_act_layer, get_norm_layer

POOL_TYPES = ("argmax", "eos", "first", "last", "final_position", "mean")


class TextTransformer(Encoder):
    """Token ids ``(B, L)`` to a pooled, projected embedding.

    Args:
        vocab_size: number of token ids.
        context_length: longest sequence the positional table covers.
        width: token size.
        layers: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden size of the feed-forward network relative to ``width``.
        output_dim: size of the projected embedding; ``None`` keeps ``width`` with no projection.
        causal: causal self-attention (CLIP); otherwise bidirectional.
        mask_padding: with ``causal=False``, keep every token from attending to padding
            (``pad_token_id``); ``False`` attends to every position, padding included, as SigLIP was
            trained (on text padded to a fixed length, without a mask).
        pool_type: ``"argmax"`` takes the token with the highest id (CLIP's end-of-text token),
            ``"eos"`` the first ``eos_token_id``, ``"first"``, ``"last"`` (last non-pad),
            ``"final_position"`` (the last position whatever it holds, padding included: SigLIP) or
            ``"mean"`` over non-pad tokens.
        eos_token_id: end-of-text id, needed for ``pool_type="eos"``.
        pad_token_id: padding id, used by ``"last"`` and ``"mean"`` pooling, the non-causal mask and the
            class token's mask.
        class_token: append a learned token after the text, which attends to all of it (CoCa); pool it with
            ``pool_type="final_position"``. The positional table then has ``context_length + 1`` rows. With a
            class token, padding is masked as open_clip's CoCa masks it, and its checkpoints were trained:
            each key's padding flag is read one position late (position 0 is always attended, position
            ``j`` when token ``j - 1`` is not padding, the class token when the last text token is not), so
            the first padding position stays visible and the class token sees itself only in a full context.
        act_layer: activation name or module class.
        norm_layer: ``"layernorm"``, ``"rmsnorm"`` or a ``factory(dim)``.
        norm_eps: epsilon of the normalisation layers.
        ls_init_value: initial LayerScale value, ``None`` for none.
        proj_bias: bias in the output projection.
        drop: dropout after attention and MLP.
        attn_drop: dropout on attention weights.
        block_heads: heads kept in each block (of width ``width // heads``), after structured
            pruning; ``None``: ``heads`` in every block.
        block_mlp_dims: MLP hidden units of each block, after pruning; ``None``: from ``mlp_ratio``.
    """

    modality = "text"

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        output_dim: int | None = 512,
        causal: bool = True,
        mask_padding: bool = True,
        pool_type: str = "argmax",
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        class_token: bool = False,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm_layer: str | Callable[[int], nn.Module] = "layernorm",
        norm_eps: float = 1e-5,
        ls_init_value: float | None = None,
        proj_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        block_heads: list[int] | None = None,
        block_mlp_dims: list[int] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        if pool_type == "eos" and eos_token_id is None:
            raise ValueError("pool_type='eos' needs eos_token_id")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.output_dim = output_dim if output_dim is not None else width
        self.causal = causal
        self.mask_padding = mask_padding
        self.pool_type = pool_type
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        factory = {"device": device, "dtype": dtype}
        norm = get_norm_layer(norm_layer, norm_eps)

        self.num_suffix_tokens = 1 if class_token else 0
        self.token_embedding = nn.Embedding(vocab_size, width, **factory)
        self.cls_token = nn.Parameter(torch.empty(width, **factory)) if class_token else None
        self.pos_embed = nn.Parameter(torch.empty(context_length + self.num_suffix_tokens, width, **factory))
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            act_layer=get_act_layer(act_layer),
            norm_layer=norm,
            ls_init_value=ls_init_value,
            drop=drop,
            attn_drop=attn_drop,
            block_heads=block_heads,
            block_mlp_dims=block_mlp_dims,
            **factory,
        )
        self.norm = norm(width).to(**factory)
        self.proj = nn.Linear(width, output_dim, bias=proj_bias, **factory) if output_dim is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.01)
        init_transformer_(self.transformer)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.width**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def layer_groups(self) -> list[list[nn.Parameter]]:
        stem = [self.token_embedding.weight, self.pos_embed]
        stem += [self.cls_token] if self.cls_token is not None else []
        head = [*self.norm.parameters(), *(self.proj.parameters() if self.proj is not None else [])]
        return [stem, *[list(b.parameters()) for b in self.transformer.blocks], head]

    def set_context_length(self, context_length: int) -> None:
        """Resize the positional table by linear interpolation (e.g. to accept longer texts)."""
        with torch.no_grad():
            table = self.pos_embed.data.t().unsqueeze(0).float()  # (1, width, L)
            size = context_length + self.num_suffix_tokens
            table = F.interpolate(table, size=size, mode="linear", align_corners=True)
            table = table.squeeze(0).t().to(self.pos_embed.dtype)  # (L', width)
        self.pos_embed = nn.Parameter(table.contiguous())
        self.context_length = context_length

    def _check(self, text: torch.Tensor) -> None:
        name = type(self).__name__
        expected = f"(B, L) with L <= {self.context_length}"
        check_input(text, name=name, ndim=2, expected=expected, floating=False)
        if text.shape[1] > self.context_length:
            raise ValueError(
                f"{name} expects token ids of shape {expected}, got shape {tuple(text.shape)}; "
                "tokenize with the model's tokenizer or call set_context_length()"
            )
        # a value check reads the data: skipped on GPU (a sync) and when tracing (export, compile)
        if (
            text.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and text.numel()
            and (text.min() < 0 or text.max() >= self.vocab_size)
        ):
            raise ValueError(
                f"{name} expects token ids in [0, {self.vocab_size}), "
                f"got values in [{int(text.min())}, {int(text.max())}]"
            )

    def _padding(self, text: torch.Tensor) -> torch.Tensor:
        return text == self.pad_token_id  # (B, L) True where padded

    def token_mask(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` True where ``text`` is not ``pad_token_id``."""
        return ~self._padding(text)

    def forward_features(self, text: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, L + num_suffix_tokens, width)``: one per text position, then the class token if any."""
        self._check(text)
        return self._tokens(text)

    def forward_hidden(self, text: torch.Tensor) -> torch.Tensor:
        """The last block's output before the final norm, ``(B, L + num_suffix_tokens, width)``: what CoCa's
        multimodal decoder reads at the text positions."""
        self._check(text)
        return self._hidden(text)

    def embed_hidden(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The embedding ``forward`` gives, from the ``forward_hidden`` states of the whole of ``text``."""
        pooled = self.pool(self.norm(hidden), text)
        return self.proj(pooled) if self.proj is not None else pooled

    def _tokens(self, text: torch.Tensor) -> torch.Tensor:
        """``forward_features`` on already checked ids."""
        return self.norm(self._hidden(text))

    def _hidden(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text)  # (B, L, width)
        if self.cls_token is not None:
            x = torch.cat([x, self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)  # (B, L + 1, width)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        if self.cls_token is not None:
            return self.transformer(x, attn_mask=self._class_token_mask(text))
        if self.causal:
            return self.transformer(x, is_causal=True)
        if not self.mask_padding:
            return self.transformer(x)
        keep = ~self._padding(text)
        mask = keep[:, None, None, :]  # (B, 1, 1, L) broadcast over heads and queries
        return self.transformer(x, attn_mask=mask)

    def _class_token_mask(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L + 1, L + 1)`` bool, True = attend: open_clip's CoCa mask (see ``class_token``), causal or not."""
        always = torch.ones_like(text[:, :1], dtype=torch.bool)
        keep = torch.cat([always, ~self._padding(text)], dim=1)  # (B, L + 1): key j kept when token j - 1 is text
        mask = keep[:, None, None, :]  # (B, 1, 1, L + 1)
        if self.causal:
            n = keep.shape[1]
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=text.device).tril()  # (B, 1, L + 1, L + 1)
        return mask

    def pool(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        if self.pool_type == "argmax":
            return tokens[batch, text.argmax(dim=-1)]
        if self.pool_type == "eos":
            is_eos = (text == self.eos_token_id).int()
            # first eos; rows without one fall back to the last position
            idx = torch.where(is_eos.any(-1), is_eos.argmax(-1), torch.full_like(batch, text.shape[1] - 1))
            return tokens[batch, idx]
        if self.pool_type == "first":
            return tokens[:, 0]
        if self.pool_type == "final_position":
            return tokens[:, -1]
        keep = ~self._padding(text)
        if self.pool_type == "last":
            idx = (keep.cumsum(-1) * keep).argmax(-1)  # index of the last non-pad token
            return tokens[batch, idx]
        weights = keep.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _used_length(self, text: torch.Tensor) -> int:
        """How many leading positions the pooled token can depend on, over the whole batch.

        With causal attention, a token sees only itself and earlier tokens, so everything after the
        last position that pooling reads (the end-of-text token, or the last non-pad token) cannot
        change the output. Cutting it off before the transformer gives the same embedding for a
        fraction of the work: captions are usually much shorter than the context.
        """
        L = text.shape[1]
        # a traced program must not bake one batch's length in, so it runs the whole input; a class token
        # sits after the whole input and sees all of it
        if torch.compiler.is_compiling() or not self.causal or L <= 1 or self.cls_token is not None:
            return L
        if self.pool_type == "first":
            return 1
        if self.pool_type == "final_position":
            return L
        if self.pool_type == "argmax":
            last = text.argmax(dim=-1)
        elif self.pool_type == "eos":
            is_eos = (text == self.eos_token_id).int()
            if not bool(is_eos.any(-1).all()):
                return L  # a row without an end-of-text token pools its last position
            last = is_eos.argmax(-1)
        else:  # "last" and "mean" read up to the last non-pad token
            keep = ~self._padding(text)
            last = (keep.cumsum(-1) * keep).argmax(-1)
        return int(last.max()) + 1

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        self._check(text)
        text = text[:, : self._used_length(text)]
        pooled = self.pool(self._tokens(text), text)  # checked once, above
        return self.proj(pooled) if self.proj is not None else pooled
