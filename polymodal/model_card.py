"""The short model card (``README.md``) that ``save_pretrained`` writes beside a model's weights.

Every figure in it is read from the model's config (``ModelConfig.input_spec`` for the inputs) and the
model itself (parameter count); where the weights came from is what the resolver recorded when it loaded
them (``model.weights_source``), or what the trainer recorded for a run.
"""

from __future__ import annotations

from torch import nn

from .config import ENCODER_TYPES, ModelConfig
from .convert_configs import tower_arg

__all__ = ["CARD_NAME", "model_card"]

CARD_NAME = "README.md"

_KINDS = {
    "contrastive": "a contrastive model: its towers embed into one shared space, compared by cosine similarity",
    "late_fusion": "a late-fusion classifier: its towers' embeddings are fused and classified",
    "captioner": "a captioner: an image tower and a caption decoder",
}


def _input_text(config: ModelConfig, modality: str) -> str:
    spec = config.input_spec(modality)
    if spec.image_size is not None:
        h, w = spec.image_size
        text = f"{h}x{w} images, {spec.channels} channels"
        if spec.mean is not None:
            text += f", mean {list(spec.mean)}, std {list(spec.std)}"
        return text + f", {spec.interpolation} resize ({spec.resize_mode})"
    if spec.sample_rate is not None:
        return f"{spec.sample_rate} Hz audio, {spec.clip_seconds:g} s clips"
    if spec.context_length is not None:
        return f"{spec.context_length} tokens"
    return "-"


def _arg(config: ModelConfig, modality: str, name: str) -> str:
    tower = config.towers[modality]
    try:
        value = tower_arg(tower, name)
    except KeyError:  # an encoder without this argument (a timm or HF wrapper)
        return "-"
    return "-" if value is None else str(value)


def model_card(model: nn.Module) -> str:
    """Markdown describing ``model``: architecture, embedding size, input spec, and its weights' source."""
    config: ModelConfig = model.config
    from polymodal import __version__

    params = sum(p.numel() for p in model.parameters())
    modalities = sorted(config.towers)
    source = getattr(model, "weights_source", None) or "not recorded (built in Python and saved with save_pretrained)"
    lines = [
        "---",
        "library_name: polymodal",
        "tags:",
        *(f"- {t}" for t in ("polymodal", config.kind, *modalities)),
        "---",
        "",
        f"# {config.name}",
        "",
        f"{_KINDS.get(config.kind, config.kind).capitalize()}. Towers: {', '.join(modalities)}.",
        "",
        "| tower | encoder | width | layers | output dim | input |",
        "|---|---|---|---|---|---|",
    ]
    for m in modalities:
        tower = config.towers[m]
        encoder = ENCODER_TYPES[tower.type].__name__
        row = [m, f"`{tower.type}` ({encoder})", _arg(config, m, "width"), _arg(config, m, "layers")]
        lines.append("| " + " | ".join([*row, _arg(config, m, "output_dim"), _input_text(config, m)]) + " |")
    lines += ["", f"- **Parameters:** {params:,}"]
    if config.kind == "contrastive":
        lines.append(f"- **Embedding size:** {config.embed_dim}")
        bias = "" if config.init_logit_bias is None else "; sigmoid loss with a logit bias"
        logit_scale = getattr(getattr(model, "alignment", None), "logit_scale", None)
        if logit_scale is not None:
            value = float(logit_scale.detach().float().exp())
            lines.append(f"- **Logit scale:** {value:.4g} (the similarity multiplier these weights hold){bias}")
    if config.kind == "late_fusion" and config.num_classes:
        lines.append(f"- **Classes:** {config.num_classes}")
    if config.tokenizer is not None:
        tok = config.tokenizer
        where = f" from {tok.path}" if tok.path else ""
        lines.append(f"- **Tokenizer:** `{tok.type}`{where}")
    lines += [
        f"- **Weights from:** {source}",
        f"- **Saved by:** polymodal {__version__} (`config.json` + `model.safetensors`)",
        "",
        "## Use",
        "",
        "```python",
        "import polymodal",
        "",
        'model = polymodal.from_pretrained("path/to/this/directory")',
        *(["tokenizer = polymodal.get_tokenizer(model)"] if config.tokenizer is not None else []),
        "```",
        "",
    ]
    return "\n".join(lines)
