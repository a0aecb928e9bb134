"""ResNet image encoders: CLIP's modified ResNet and a torchvision ResNet backbone.

``ResNetEncoder`` computes what open_clip's ``ModifiedResNet`` computes and shares its state-dict
keys, except the attention pool, which uses one fused qkv projection
(``attnpool.qkv`` = cat of open_clip's ``q_proj, k_proj, v_proj``; ``attnpool.proj`` = ``c_proj``;
``attnpool.pos_embed`` = ``positional_embedding``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .base import Encoder
from .layers import check_input, get_act_layer, to_pair
from .vit import resample_pos_embed


def _norm2d(norm_layer: str | Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    if callable(norm_layer):
        return norm_layer
    if norm_layer == "batchnorm":
        return nn.BatchNorm2d
    raise ValueError(f"unknown norm layer {norm_layer!r}; expected 'batchnorm' or a factory(channels)")


@contextlib.contextmanager
def _preserve_norm_stats(module: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics on exit.

    Checkpointing re-runs a stage's forward in the backward pass; without this, every BatchNorm
    in training mode would fold the same batch into its running statistics twice.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])


def _checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return checkpoint(
        stage,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _preserve_norm_stats(stage)),
    )


class Bottleneck(nn.Module):
    """CLIP's bottleneck: a stride is an average pool before the last 1x1 conv (anti-aliasing)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False, **factory)
        self.bn1 = norm_layer(planes).to(**factory)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, **factory)
        self.bn2 = norm_layer(planes).to(**factory)
        self.act2 = act_layer()
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False, **factory)
        self.bn3 = norm_layer(out).to(**factory)
        self.act3 = act_layer()
        self.downsample = None
        if stride > 1 or inplanes != out:
            # "-1" holds no parameters, so the keys stay downsample.0 / downsample.1 as in open_clip
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False, **factory)),
                        ("1", norm_layer(out).to(**factory)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.act3(out + identity)


class AttentionPool2d(Attention):
    """Pool a feature map by letting its mean token attend over all spatial tokens.

    The attention (``qkv``, ``proj``) is ``encoders.attention.Attention``; only the mean token's query
    is computed, since only its output is kept.

    Args:
        grid_size: feature-map height and width the positional table is built for.
        embed_dim: channels of the feature map.
        num_heads: attention heads.
        output_dim: size of the output projection; ``None`` keeps ``embed_dim``.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        embed_dim: int,
        num_heads: int,
        output_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim % num_heads:
            raise ValueError(f"attention pool width {embed_dim} must be divisible by the number of heads {num_heads}")
        grid_size = to_pair(grid_size)
        if min(grid_size) < 1:
            raise ValueError(f"attention pool grid {grid_size} is empty; is the image size below 32?")
        super().__init__(embed_dim, num_heads, out_dim=output_dim, device=device, dtype=dtype)
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(
            torch.empty(grid_size[0] * grid_size[1] + 1, embed_dim, device=device, dtype=dtype)
        )
        nn.init.normal_(self.pos_embed, std=embed_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1+H*W, C)
        pos = resample_pos_embed(self.pos_embed, self.grid_size, (H, W), num_prefix_tokens=1)
        tokens = tokens + pos.to(tokens.dtype)
        k, v = self.keys_values(tokens)  # 2 x (B, heads, 1+H*W, head_dim)
        return self.attend(self.queries(tokens[:, :1]), k, v)[:, 0]  # (B, output_dim)


class ResNetEncoder(Encoder):
    """CLIP's modified ResNet: 3-conv stem, anti-aliased bottlenecks and attention pooling.

    Args:
        layers: bottleneck blocks in each of the four stages.
        output_dim: size of the pooled embedding.
        heads: attention heads of the pool.
        image_size: input size the pool's positional table is built for; other sizes interpolate it.
        width: channels after the stem; stage ``i`` has ``width * 2**i`` planes and ``width * 32`` come out.
        in_chans: input channels.
        norm_layer: ``"batchnorm"`` or a ``factory(channels)`` of the normalisation layers.
        act_layer: activation name or module class.
    """

    modality = "image"

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        output_dim: int = 1024,
        heads: int = 32,
        image_size: int | tuple[int, int] = 224,
        width: int = 64,
        in_chans: int = 3,
        norm_layer: str | Callable[[int], nn.Module] = "batchnorm",
        act_layer: str | Callable[[], nn.Module] = "relu",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        norm_layer = _norm2d(norm_layer)
        if len(layers) != 4:
            raise ValueError(f"layers must give the blocks of 4 stages, got {layers!r}")
        self.image_size = to_pair(image_size)
        self.in_chans = in_chans
        self.output_dim = output_dim
        self.width = width * 32
        self.grad_checkpointing = False
        factory = {"device": device, "dtype": dtype}
        act = get_act_layer(act_layer)

        self.conv1 = nn.Conv2d(in_chans, width // 2, 3, stride=2, padding=1, bias=False, **factory)
        self.bn1 = norm_layer(width // 2).to(**factory)
        self.act1 = act()
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False, **factory)
        self.bn2 = norm_layer(width // 2).to(**factory)
        self.act2 = act()
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False, **factory)
        self.bn3 = norm_layer(width).to(**factory)
        self.act3 = act()
        self.avgpool = nn.AvgPool2d(2)

        block = partial(Bottleneck, norm_layer=norm_layer, act_layer=act, **factory)
        inplanes, stages = width, []
        for i, depth in enumerate(layers):
            planes = width * 2**i
            blocks = [block(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [block(planes * 4, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        grid = (self.image_size[0] // 32, self.image_size[1] // 32)
        self.attnpool = AttentionPool2d(grid, self.width, heads, output_dim, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.width**-0.5
        nn.init.normal_(self.attnpool.pos_embed, std=std)
        nn.init.normal_(self.attnpool.qkv.weight, std=std)
        nn.init.normal_(self.attnpool.proj.weight, std=std)
        # zero the last norm of every block so each starts as the identity
        for stage in self.stages:
            for blk in stage:
                if getattr(blk.bn3, "weight", None) is not None:
                    nn.init.zeros_(blk.bn3.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def layer_groups(self) -> list[list[nn.Parameter]]:
        stem = [p for m in (self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3) for p in m.parameters()]
        return [stem, *[list(s.parameters()) for s in self.stages], list(self.attnpool.parameters())]

    def _check(self, x: torch.Tensor) -> None:
        expected = f"(B, {self.in_chans}, H, W) with H, W >= 32"
        check_input(x, name=type(self).__name__, ndim=4, expected=expected, dim_sizes={1: self.in_chans})
        if x.shape[-2] < 32 or x.shape[-1] < 32:
            raise ValueError(f"{type(self).__name__} expects shape {expected}, got shape {tuple(x.shape)}")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's feature map ``(B, width, H/32, W/32)``."""
        self._check(x)
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = _checkpointed(stage, x)
            else:
                x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).flatten(2).transpose(1, 2)  # (B, H*W, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_map(x))


class TorchvisionResNetEncoder(Encoder):
    """A torchvision ResNet (or ResNeXt / Wide ResNet) trunk, pooled and projected.

    Args:
        arch: torchvision model name, e.g. ``"resnet18"``, ``"resnet50"``, ``"resnext50_32x4d"``.
        output_dim: size of the projected embedding.
        pool_type: ``"avg"`` (global average pool then a linear projection) or ``"attn"``
            (CLIP-style attention pool whose output projection gives ``output_dim``).
        in_chans: input channels; a value other than 3 replaces the first convolution.
        weights_path: a local torchvision state-dict file (``.safetensors`` or a torch pickle);
            its ``fc.*`` classifier entries are ignored. Nothing is ever downloaded.
        image_size: input size the attention pool's positional table is built for.
        heads: attention-pool heads; defaults to ``width // 64``.
        norm_layer: ``"batchnorm"`` or a ``factory(channels)`` passed to torchvision.
    """

    modality = "image"

    def __init__(
        self,
        arch: str = "resnet50",
        output_dim: int = 512,
        pool_type: str = "avg",
        in_chans: int = 3,
        weights_path: str | None = None,
        image_size: int | tuple[int, int] = 224,
        heads: int | None = None,
        norm_layer: str | Callable[[int], nn.Module] = "batchnorm",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if pool_type not in ("avg", "attn"):
            raise ValueError(f"pool_type must be 'avg' or 'attn', got {pool_type!r}")
        try:
            trunk = torchvision.models.get_model(arch, weights=None, norm_layer=_norm2d(norm_layer))
        except ValueError as e:
            raise ValueError(f"unknown torchvision model {arch!r}: {e}") from e
        except TypeError as e:  # builders without norm_layer are not ResNets
            raise ValueError(f"{arch!r} is not a torchvision ResNet-family model") from e
        if not all(hasattr(trunk, n) for n in ("conv1", "layer4", "fc")):
            raise ValueError(f"{arch!r} is not a torchvision ResNet-family model")
        if in_chans != 3:
            old = trunk.conv1
            trunk.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        self.width = trunk.fc.in_features
        trunk.fc = nn.Identity()
        if weights_path is not None:
            from .weights import load_weights_file

            load_weights_file(trunk, weights_path, ignore_prefixes=("fc.",))
        self.trunk = trunk.to(device=device, dtype=dtype)
        self.arch, self.pool_type, self.in_chans = arch, pool_type, in_chans
        self.output_dim = output_dim
        self.image_size = to_pair(image_size)
        self.grad_checkpointing = False
        factory = {"device": device, "dtype": dtype}
        if pool_type == "attn":
            grid = (self.image_size[0] // 32, self.image_size[1] // 32)
            self.pool = AttentionPool2d(grid, self.width, heads or max(self.width // 64, 1), output_dim, **factory)
            self.proj = None
        else:
            self.pool = None
            self.proj = nn.Linear(self.width, output_dim, **factory)
            nn.init.normal_(self.proj.weight, std=self.width**-0.5)
            nn.init.zeros_(self.proj.bias)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def layer_groups(self) -> list[list[nn.Parameter]]:
        stem = [*self.trunk.conv1.parameters(), *self.trunk.bn1.parameters()]
        head = list(self.pool.parameters() if self.pool is not None else self.proj.parameters())
        return [stem, *[list(s.parameters()) for s in self.stages], head]

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's feature map ``(B, width, H/32, W/32)``."""
        check_input(
            x,
            name=type(self).__name__,
            ndim=4,
            expected=f"(B, {self.in_chans}, H, W)",
            dim_sizes={1: self.in_chans},
        )
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = _checkpointed(stage, x)
            else:
                x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).flatten(2).transpose(1, 2)  # (B, H*W, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_map(x)
        if self.pool is not None:
            return self.pool(fmap)
        return self.proj(fmap.mean(dim=(2, 3)))
