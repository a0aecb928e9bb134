"""Any timm image model as an encoder, with weights only ever read from a local file."""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import Encoder
from .layers import check_input
from .weights import load_weights_file


class TimmEncoder(Encoder):
    """A timm model's trunk, pooled by timm's own head and projected.

    Args:
        model_name: any name from ``timm.list_models()``; the model is built with random weights.
        output_dim: size of the projected embedding; with ``proj=None`` it must be ``None`` or the
            width of timm's pooled features.
        pretrained_path: a local weights file for the timm model (``.safetensors`` or torch pickle).
            Classifier weights in it are ignored. Nothing is ever downloaded.
        pool_type: timm's ``global_pool`` (``"token"``, ``"avg"``, ...); ``None`` keeps the model's default.
        proj: ``"linear"``, ``"mlp"`` (two layers with a GELU, hidden ``2 * output_dim``), ``"head"`` (timm's
            own classifier head, built with ``output_dim`` outputs, is the projection; its weights stay
            under ``trunk``, as open_clip's timm towers without ``timm_proj`` keep them) or ``None``.
        in_chans: input channels.
        image_size: input size for models that take one (ViTs); ``None`` keeps the default.
        drop_path: stochastic depth rate.
        proj_bias: bias in the (last) projection layer.
    """

    modality = "image"

    def __init__(
        self,
        model_name: str,
        output_dim: int | None = 512,
        pretrained_path: str | os.PathLike | None = None,
        pool_type: str | None = None,
        proj: str | None = "linear",
        in_chans: int = 3,
        image_size: int | tuple[int, int] | None = None,
        drop_path: float = 0.0,
        proj_bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        import timm  # imported here so that `import polymodal.encoders` stays light

        super().__init__()
        if proj not in ("linear", "mlp", "head", None):
            raise ValueError(f"proj must be 'linear', 'mlp', 'head' or None, got {proj!r}")
        if proj == "head" and not output_dim:
            raise ValueError("proj='head' builds timm's classifier with output_dim outputs; give output_dim")
        if pool_type == "":
            raise ValueError("pool_type='' would leave the features unpooled; use forward_features for tokens")
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}")
        extra = {"drop_path_rate": drop_path} if drop_path else {}
        self.trunk = timm.create_model(
            model_name,
            pretrained=False,
            num_classes=output_dim if proj == "head" else 0,
            global_pool=pool_type,
            in_chans=in_chans,
            img_size=image_size,
            **extra,
        )
        if pretrained_path is not None:
            classifier = self.trunk.pretrained_cfg.get("classifier") or ()
            classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            load_weights_file(self.trunk, pretrained_path, ignore_prefixes=tuple(f"{c}." for c in classifier))
        self.trunk.to(device=device, dtype=dtype)
        self.model_name, self.in_chans = model_name, in_chans
        self.head_is_pooling = proj != "head"  # else timm's classifier head is the projection
        self.width = self.trunk.num_features
        # some heads (e.g. MambaOut's) widen the pooled features beyond the token width
        pooled_dim = getattr(self.trunk, "head_hidden_size", None) or self.width
        factory = {"device": device, "dtype": dtype}
        if proj == "head":
            self.output_dim = output_dim
            self.proj = nn.Identity()
        elif proj is None:
            if output_dim not in (None, pooled_dim):
                raise ValueError(f"proj=None keeps the pooled width {pooled_dim}; got output_dim={output_dim}")
            self.output_dim = pooled_dim
            self.proj = nn.Identity()
        elif output_dim is None:
            raise ValueError(f"proj={proj!r} needs an output_dim")
        elif proj == "linear":
            self.output_dim = output_dim
            self.proj = nn.Linear(pooled_dim, output_dim, bias=proj_bias, **factory)
        else:
            self.output_dim = output_dim
            self.proj = nn.Sequential(
                nn.Linear(pooled_dim, 2 * output_dim, **factory),
                nn.GELU(),
                nn.Linear(2 * output_dim, output_dim, bias=proj_bias, **factory),
            )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        if not hasattr(self.trunk, "group_matcher"):
            return [list(self.trunk.parameters()), list(self.proj.parameters())]
        from timm.models import group_parameters

        groups = group_parameters(self.trunk, self.trunk.group_matcher(coarse=True), return_values=True)
        return [*(list(groups[k]) for k in sorted(groups)), list(self.proj.parameters())]

    def _check(self, x: torch.Tensor) -> None:
        name, expected = type(self).__name__, f"(B, {self.in_chans}, H, W)"
        patch_embed = getattr(self.trunk, "patch_embed", None)
        # ViTs built without dynamic_img_size only accept the size their positional table was built for
        size = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
        if size is not None:
            expected = f"(B, {self.in_chans}, {size[0]}, {size[1]})"
        check_input(x, name=name, ndim=4, expected=expected, dim_sizes={1: self.in_chans})
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(
                f"{name} expects shape {expected}, got shape {tuple(x.shape)}; "
                "build it with image_size= to change the input size"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` as tokens: ViT-like models as they are, feature maps flattened."""
        self._check(x)
        x = self.trunk.forward_features(x)
        if x.ndim == 4:
            if getattr(self.trunk, "output_fmt", "NCHW") == "NHWC":
                return x.flatten(1, 2)  # (B, H*W, C)
            return x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        pooled = self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=self.head_is_pooling)
        return self.proj(pooled)
