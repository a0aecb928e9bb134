"""Explanation maps: where in an image (or a sound's spectrogram) a contrastive model sees a text.

Every map explains one score, the cosine similarity between the input's embedding and the text's,
``model.encode(modality, x, normalize=True) @ model.encode("text", tokens, normalize=True)``:

- ``gradcam``: Grad-CAM (https://arxiv.org/abs/1610.02391) with captum's ``LayerGradCam``, on the last
  stage of a ResNet, or on the patch tokens entering a ViT's last block, seen as a grid;
- ``rollout``: attention rollout for ViTs (Abnar & Zuidema, https://arxiv.org/abs/2005.00928): each block's
  head-averaged attention with the residual connection added, renormalised and multiplied through the
  blocks; the pooled token's row over the patches. Needs no gradient, and no text: it is the same for
  every text;
- ``grad_rollout``: gradient-weighted rollout for ViTs (Chefer et al., https://arxiv.org/abs/2103.15679):
  each head's attention weighted by the positive part of its gradient, so it follows the text;
- ``saliency``: the gradient's magnitude (captum's ``Saliency``) over what the tower reads: the log-mel
  spectrogram of an audio tower, the pixels of an image tower.

The attention methods live in ``attention_maps``. Maps come back as float32 CPU tensors at the input's
layout, ``(B, H, W)`` for images (coarser maps upsampled bilinearly) and ``(B, n_mels, frames)`` for audio,
each scaled to [0, 1] (min to 0, max to 1; an all-zero map stays zero).

A ViT's maps are a grid of patches, so their peak always sits at a patch's centre. ``shifts=k`` averages
the maps of ``k * k`` copies of the image shifted by fractions ``1/k`` of a patch (and the maps shifted
back), for maps with ``k`` times the patch grid's resolution (as Augmented Grad-CAM does,
https://arxiv.org/abs/2002.11484), at ``k * k`` times the cost. ``upscale=f`` explains the image resized by
``f`` (bicubic; to the nearest multiple of the patch size, or of a ResNet's stride 32): the patch grid is then
finer against the image's content (the ViT interpolates its position table), and the map is resized back to
the image's size. On the demo model's pointing game the two together place the peak on the named shape far
more often than either (``benchmarks/pointing_game.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders import VisionTransformer
from polymodal.errors import InputError

from .attention_maps import gradient_rollout_map, rollout_map, token_grid
from .embedding import eval_mode, model_device

__all__ = [
    "EXPLANATION_METHODS",
    "default_method",
    "explain",
    "explanation_methods",
    "input_spectrogram",
    "normalize_maps",
    "resolve_method",
]

EXPLANATION_METHODS = ("gradcam", "rollout", "grad_rollout", "saliency")

Tokenizer = Callable[[list[str]], torch.Tensor]
Score = Callable[[torch.Tensor], torch.Tensor]  # inputs (B, ...) -> similarity (B,)


def explanation_methods(tower: nn.Module) -> tuple[str, ...]:
    """The methods that can explain ``tower``: the rollouts need a ViT, Grad-CAM a ViT or a ResNet (a tower
    with ``stages``), saliency works for every tower."""
    if isinstance(tower, VisionTransformer):
        return EXPLANATION_METHODS
    if hasattr(tower, "stages"):
        return ("gradcam", "saliency")
    return ("saliency",)


def default_method(tower: nn.Module) -> str:
    """``saliency`` for an audio tower, ``gradcam`` for an image tower that has it, else ``saliency``."""
    if getattr(tower, "modality", None) == "audio":
        return "saliency"
    return "gradcam" if "gradcam" in explanation_methods(tower) else "saliency"


def resolve_method(
    model: nn.Module, modality: str, method: str | None = None, shifts: int = 1, upscale: float = 1.0
) -> str:
    """``method``, or the ``modality`` tower's ``default_method``, checked: the model must have that tower and a
    text tower, the method must be one the tower has (``explanation_methods``), ``shifts`` (see ``explain``)
    a positive integer, above 1 for a ViT only, and ``upscale`` a number from 1 to 8, above 1 for images only.

    Raises:
        InputError: naming what is missing or wrong, and what was expected.
    """
    tower = _tower(model, modality)
    if isinstance(shifts, bool) or not isinstance(shifts, int) or shifts < 1:
        raise InputError(f"shifts must be a positive integer, got {shifts!r}")
    if shifts > 1 and not isinstance(tower, VisionTransformer):
        raise InputError(f"shifts refine a ViT's patch grid; this {modality} tower is a {type(tower).__name__}")
    if isinstance(upscale, bool) or not isinstance(upscale, (int, float)) or not 1.0 <= upscale <= 8.0:
        raise InputError(f"upscale must be a number from 1 (the image as it is) to 8, got {upscale!r}")
    if upscale != 1.0 and modality != "image":
        raise InputError(f"upscale resizes images; the {modality} tower's input is not an image")
    if method is None:
        return default_method(tower)
    if method not in EXPLANATION_METHODS:
        raise InputError(f"unknown explanation method {method!r}; expected one of {', '.join(EXPLANATION_METHODS)}")
    methods = explanation_methods(tower)
    if method not in methods:
        choices = f"{', '.join(methods[:-1])} or {methods[-1]}" if len(methods) > 1 else methods[0]
        raise InputError(
            f"{method} cannot explain this model's {modality} tower, a {type(tower).__name__}; it takes {choices}"
        )
    return method


def explain(
    model: nn.Module,
    modality: str,
    inputs: torch.Tensor,
    text: str | Sequence[str],
    tokenizer: Tokenizer,
    method: str | None = None,
    rollout_start: int = 0,
    shifts: int = 1,
    upscale: float = 1.0,
) -> torch.Tensor:
    """Maps ``(B, H, W)`` (images) or ``(B, n_mels, frames)`` (audio) of where the ``modality`` tower sees ``text``.

    Args:
        model: a contrastive model (``towers`` and ``encode``) with a ``modality`` tower and a text tower.
        modality: the tower ``inputs`` are for, ``"image"`` or ``"audio"``.
        inputs: a batch as that tower takes it: preprocessed images ``(B, C, H, W)``, waveforms ``(B, samples)``.
        text: one text for every input, or one per input.
        tokenizer: the model's tokenizer (``polymodal.get_tokenizer(model)``).
        method: one of ``EXPLANATION_METHODS``; ``None``: ``default_method`` of the tower.
        rollout_start: the first block the rollouts take in.
        shifts: average over ``shifts * shifts`` shifted copies, for finer ViT maps (see the module docstring).
        upscale: explain the images resized by this factor, for finer maps (see the module docstring); the
            maps come back at the images' own size.

    Raises:
        InputError: no such tower or no text tower, an empty text, an unknown method or one the tower
            does not have (``explanation_methods``), ``shifts`` for a tower other than a ViT, ``upscale``
            outside [1, 8] or for audio.
    """
    method = resolve_method(model, modality, method, shifts, upscale)
    tower = model.towers[modality]
    texts = _texts(text, len(inputs))
    inputs = inputs.to(model_device(model))
    size = tuple(inputs.shape[-2:])
    if upscale != 1.0:
        inputs = _resized(inputs, upscale, tower)
    with eval_mode(model), torch.enable_grad():
        score = _similarity(model, modality, _text_embedding(model, texts, tokenizer))

        def one(x: torch.Tensor) -> torch.Tensor:
            if method == "rollout":
                return rollout_map(tower, x, rollout_start)
            if method == "grad_rollout":
                return gradient_rollout_map(tower, score, x, rollout_start)
            return _gradcam(tower, score, x) if method == "gradcam" else _saliency(tower, score, x)

        maps = one(inputs) if shifts == 1 else _shift_average(one, inputs, tower.patch_size, shifts)
    if upscale != 1.0:  # back to the images' own layout
        maps = F.interpolate(maps.detach().float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)[
            :, 0
        ]
    return normalize_maps(maps)


def _resized(images: torch.Tensor, upscale: float, tower: nn.Module) -> torch.Tensor:
    """``images (B, C, H, W)`` resized by ``upscale`` to the nearest size the tower takes: a multiple of a ViT's
    patch, of a ResNet's stride 32."""
    step = tower.patch_size if isinstance(tower, VisionTransformer) else (32, 32)
    size = [max(1, round(d * upscale / s)) * s for d, s in zip(images.shape[-2:], step)]
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map ``(B, ...)`` shifted and scaled to [0, 1], float32 on the CPU; non-finite values count as 0."""
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    flat = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return flat.view_as(maps)


def input_spectrogram(model: nn.Module, waveforms: torch.Tensor, modality: str = "audio") -> torch.Tensor:
    """The log-mel spectrogram ``(B, n_mels, frames)`` the ``modality`` tower computes from ``waveforms``,
    the layout its saliency maps have (to draw them over)."""
    tower = _tower(model, modality, need_text=False)
    front = getattr(tower, "spectrogram", None)
    if front is None:
        raise InputError(f"the {modality} tower, a {type(tower).__name__}, computes no spectrogram of its input")
    seen: list[torch.Tensor] = []
    handle = front.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        with eval_mode(model), torch.no_grad():
            tower(waveforms.to(model_device(model)))
    finally:
        handle.remove()
    return seen[0].float().cpu()


# ------------------------------------------------------------------------------------------ internals


def _tower(model: nn.Module, modality: str, need_text: bool = True) -> nn.Module:
    towers = getattr(model, "towers", None)
    if not isinstance(towers, nn.ModuleDict) or not hasattr(model, "encode"):
        raise InputError(f"explanations need a contrastive model with towers, got a {type(model).__name__}")
    if modality not in towers:
        raise InputError(f"this model has no {modality} tower to explain (it has {sorted(towers)})")
    if need_text and "text" not in towers:
        raise InputError(f"explanations score inputs against a text; this model has no text tower ({sorted(towers)})")
    return towers[modality]


def _texts(text: str | Sequence[str], batch: int) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if len(texts) not in (1, batch):
        raise InputError(f"give one text, or one per input ({batch}), got {len(texts)}")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("the text to explain is empty; give a caption such as 'a red circle'")
    return texts


def _text_embedding(model: nn.Module, texts: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    with torch.no_grad():
        tokens = tokenizer(texts).to(model_device(model))
        return model.encode("text", tokens, normalize=True)  # (1 or B, D)


def _similarity(model: nn.Module, modality: str, target: torch.Tensor) -> Score:
    def score(x: torch.Tensor) -> torch.Tensor:
        return (model.encode(modality, x, normalize=True) * target).sum(dim=-1)  # (B,)

    return score


def _gradcam(tower: nn.Module, score: Score, inputs: torch.Tensor) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam  # captum imports matplotlib: only when explaining

    if isinstance(tower, VisionTransformer):
        grid = (inputs.shape[-2] // tower.patch_size[0], inputs.shape[-1] // tower.patch_size[1])
        with token_grid(tower, grid) as layer:
            cam = LayerGradCam(score, layer).attribute(inputs, relu_attributions=True)
    else:
        cam = LayerGradCam(score, tower.stages[-1]).attribute(inputs, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return cam[:, 0]  # (B, H, W)


def _saliency(tower: nn.Module, score: Score, inputs: torch.Tensor) -> torch.Tensor:
    from captum.attr import Saliency  # captum imports matplotlib: only when explaining

    front = getattr(tower, "spectrogram", None)
    if front is None:  # the tower reads its input as it is: explain that
        grads = Saliency(score).attribute(inputs.detach().requires_grad_(), abs=True)
        return grads.amax(dim=1) if grads.ndim == 4 else grads  # (B, H, W): the strongest channel
    seen: list[torch.Tensor] = []
    handle = front.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            score(inputs)
    finally:
        handle.remove()

    def from_spectrogram(mel: torch.Tensor) -> torch.Tensor:
        # the tower runs on the waveform as usual, its spectrogram swapped for ``mel``, the input captum varies
        swap = front.register_forward_hook(lambda module, args, out: mel)
        try:
            return score(inputs)
        finally:
            swap.remove()

    return Saliency(from_spectrogram).attribute(seen[0].requires_grad_(), abs=True)  # (B, n_mels, frames)


def _shift_average(
    explain_one: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, cell: tuple[int, int], shifts: int
) -> torch.Tensor:
    """The mean of ``explain_one``'s maps of ``inputs (B, C, H, W)`` moved down and right by ``i * cell / shifts``
    pixels (``i < shifts`` on each axis), each map moved back (pixels a copy left out count only in the others)."""
    B, _, H, W = inputs.shape
    ph, pw = cell
    padded = F.pad(inputs, (pw, pw, ph, ph), mode="replicate")  # the edge (background) carries on
    total = torch.zeros(B, H, W)
    count = torch.zeros(H, W)
    for i in range(shifts):
        for j in range(shifts):
            dy, dx = i * ph // shifts, j * pw // shifts
            moved = padded[..., ph - dy : ph - dy + H, pw - dx : pw - dx + W]  # content at (y + dy, x + dx)
            maps = normalize_maps(explain_one(moved))  # (B, H, W), each copy weighing the same
            total[:, : H - dy, : W - dx] += maps[:, dy:, dx:]
            count[: H - dy, : W - dx] += 1
    return total / count
