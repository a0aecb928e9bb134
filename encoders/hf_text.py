"""A Hugging Face transformers encoder (BERT, RoBERTa, ...) as a text encoder.

Models are built only from a local directory or from a config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Encoder
from .layers import check_input

if TYPE_CHECKING:  # transformers is imported on first use, so `import polymodal.encoders` stays light
    from transformers import PretrainedConfig

POOL_TYPES = ("cls", "mean", "last", "eos")


def _build_config(config: PretrainedConfig | Mapping[str, Any]) -> PretrainedConfig:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError("config must be a transformers PretrainedConfig or a dict with a 'model_type' key")
    kwargs = dict(config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _model_kwargs(config: PretrainedConfig) -> dict[str, Any]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    """Drop the pooler of models that have one: it is never used here and would get no gradient."""
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError as e:
        raise ValueError(f"transformers has no AutoModel for config type {type(config).__name__}") from e
    if "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


class HFTextEncoder(Encoder):
    """Token ids ``(B, L)`` through a transformers encoder, pooled and projected.

    Args:
        model_name_or_path: a local directory written by ``save_pretrained``; read with
            ``local_files_only=True``.
        config: instead of a directory, a ``PretrainedConfig`` or a dict with ``model_type``;
            the model gets random weights.
        output_dim: size of the projected embedding; must be ``None`` or the hidden size when ``proj=None``.
        pool_type: ``"cls"`` (first token), ``"mean"`` (over non-pad tokens), ``"last"`` (last
            non-pad token) or ``"eos"`` (first ``eos_token_id``; rows without one use their last
            non-pad token).
        proj: ``"linear"``, ``"mlp"`` (two layers with a GELU, hidden ``(hidden + output_dim) // 2``)
            or ``None``.
        pad_token_id: id whose positions are masked out; defaults to the config's ``pad_token_id``
            (``None`` there means no masking).
        eos_token_id: id used by ``pool_type="eos"``; defaults to the config's ``eos_token_id``,
            then ``sep_token_id``.
        proj_bias: bias in the projection layers.
    """

    modality = "text"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | None = None,
        config: PretrainedConfig | Mapping[str, Any] | None = None,
        output_dim: int | None = 512,
        pool_type: str = "cls",
        proj: str | None = "linear",
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        proj_bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        from transformers import AutoConfig, AutoModel

        super().__init__()
        if (model_name_or_path is None) == (config is None):
            raise ValueError("give exactly one of model_name_or_path (a local directory) or config")
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        if proj not in ("linear", "mlp", None):
            raise ValueError(f"proj must be 'linear', 'mlp' or None, got {proj!r}")
        if model_name_or_path is not None:
            if not os.path.isdir(model_name_or_path):
                raise ValueError(
                    f"{str(model_name_or_path)!r} is not a local directory; "
                    "save the model with save_pretrained() first (nothing is downloaded)"
                )
            cfg = AutoConfig.from_pretrained(model_name_or_path, local_files_only=True)
            model = AutoModel.from_pretrained(
                model_name_or_path, config=cfg, local_files_only=True, **_model_kwargs(cfg)
            )
        else:
            cfg = _build_config(config)
            model = AutoModel.from_config(cfg, **_model_kwargs(cfg))
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; give an encoder-only model")
        # a checkpoint saved in half precision would otherwise stay so; the projection uses the default dtype
        self.transformer = model.to(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        self.hf_config = cfg
        self.width = cfg.hidden_size
        self.pool_type = pool_type
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(cfg, "eos_token_id", None)
            eos_token_id = eos_token_id if eos_token_id is not None else getattr(cfg, "sep_token_id", None)
        if pool_type == "eos" and eos_token_id is None:
            raise ValueError(
                "pool_type='eos' needs eos_token_id (the config has neither eos_token_id nor sep_token_id)"
            )
        self.eos_token_id = eos_token_id
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.max_length = getattr(cfg, "max_position_embeddings", None)

        factory = {"device": device, "dtype": dtype}
        if proj is None:
            if output_dim not in (None, self.width):
                raise ValueError(f"proj=None keeps the hidden size {self.width}; got output_dim={output_dim}")
            self.output_dim = self.width
            self.proj = nn.Identity()
        elif output_dim is None:
            raise ValueError(f"proj={proj!r} needs an output_dim")
        elif proj == "linear":
            self.output_dim = output_dim
            self.proj = nn.Linear(self.width, output_dim, bias=proj_bias, **factory)
        else:
            self.output_dim = output_dim
            hidden = (self.width + output_dim) // 2
            self.proj = nn.Sequential(
                nn.Linear(self.width, hidden, bias=proj_bias, **factory),
                nn.GELU(),
                nn.Linear(hidden, output_dim, bias=proj_bias, **factory),
            )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not getattr(self.transformer, "supports_gradient_checkpointing", False):
            raise NotImplementedError(f"{type(self.transformer).__name__} does not support gradient checkpointing")
        model, kwargs = self.transformer, {"use_reentrant": False}
        renamed = hasattr(model, "activation_checkpointing_enable")  # newer transformers renamed the methods
        if enable and renamed:
            model.activation_checkpointing_enable(kwargs)
        elif enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif renamed:
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings, each layer of the stack (the longest ``ModuleList``), then the rest + projection."""
        lists = [m for m in self.transformer.modules() if isinstance(m, nn.ModuleList)]
        head = list(self.proj.parameters())
        if not lists:
            return [list(self.transformer.parameters()), head]
        stack = max(lists, key=len)
        in_stack = {id(p) for p in stack.parameters()}
        before, after, seen = [], [], False
        for p in self.transformer.parameters():  # registration order: embeddings, layers, final norm
            if id(p) in in_stack:
                seen = True
            else:
                (after if seen else before).append(p)
        return [before, *[list(layer.parameters()) for layer in stack], after + head]

    def _check(self, text: torch.Tensor) -> None:
        name = type(self).__name__
        expected = "(B, L)" + (f" with L <= {self.max_length}" if self.max_length else "")
        check_input(text, name=name, ndim=2, expected=expected, floating=False)
        if self.max_length and text.shape[1] > self.max_length:
            raise ValueError(f"{name} expects token ids of shape {expected}, got shape {tuple(text.shape)}")
        if (
            self.vocab_size
            and text.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and text.numel()
            and (text.min() < 0 or text.max() >= self.vocab_size)
        ):
            raise ValueError(
                f"{name} expects token ids in [0, {self.vocab_size}), "
                f"got values in [{int(text.min())}, {int(text.max())}]"
            )

    def attention_mask(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` with 1 on real tokens and 0 on padding."""
        if self.pad_token_id is None:
            return torch.ones_like(text)
        return (text != self.pad_token_id).long()

    def token_mask(self, text: torch.Tensor) -> torch.Tensor | None:
        """``(B, L)`` True on real tokens; ``None`` without a padding id."""
        return None if self.pad_token_id is None else text != self.pad_token_id

    def _encode(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(text)
        mask = self.attention_mask(text)
        out = self.transformer(input_ids=text, attention_mask=mask)
        return out.last_hidden_state, mask  # (B, L, hidden), (B, L)

    def forward_features(self, text: torch.Tensor) -> torch.Tensor:
        return self._encode(text)[0]

    def pool(self, tokens: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "cls":
            return tokens[:, 0]
        if self.pool_type == "mean":
            weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
            return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last non-pad token
        if self.pool_type == "last":
            return tokens[batch, last]
        is_eos = (text == self.eos_token_id).int()
        return tokens[batch, torch.where(is_eos.any(-1), is_eos.argmax(-1), last)]

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        tokens, mask = self._encode(text)
        return self.proj(self.pool(tokens, text, mask))
