"""Writing a polymodal model in foreign formats: Hugging Face CLIP / SigLIP directories and open_clip checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from polymodal.encoders import CLIPTokenizer, HFTokenizer
from polymodal.fileio import atomic_directory, atomic_file

from .checkpoint import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, CheckpointError, save_state_dict
from .convert import (
    hf_config_from,
    hf_model_type,
    open_clip_model_cfg,
    polymodal_to_hf,
    polymodal_to_open_clip,
    siglip_config_from,
)
from .convert_configs import HF_RESAMPLE
from .factory import get_tokenizer

EXPORT_FORMATS = ("polymodal", "hf", "open_clip")


def _config(model: nn.Module):
    if getattr(model, "config", None) is None:
        raise CheckpointError(f"this {type(model).__name__} carries no ModelConfig, so it cannot be exported")
    if model.config.lora is not None:
        raise CheckpointError(
            "this model has LoRA adapters, which the other formats have no place for; merge them first "
            "(polymodal lora merge, or polymodal.lora.merge_lora)"
        )
    return model.config


def export_hf(model: nn.Module, destination: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Hugging Face directory for this model: a ``SiglipModel`` when it has SigLIP's image head
    (``convert.hf_model_type``), else a ``CLIPModel``; its config, weights, image processor, and its tokenizer's
    files (an ``"hf"`` tokenizer as saved by transformers; the built-in CLIP BPE as ``CLIPTokenizer`` files)."""
    import transformers

    config = _config(model)
    model_type = hf_model_type(config)
    if model_type == "siglip":
        hf_config = transformers.SiglipConfig(**siglip_config_from(config))
        processor_class = transformers.SiglipImageProcessor
    else:
        hf_config = transformers.CLIPConfig(**hf_config_from(config))
        processor_class = transformers.CLIPImageProcessor
    processor = processor_class(**_image_processor_kwargs(config))
    state = dict(model.state_dict())
    alignment = model.alignment
    # neither HF model clamps its logit scale, so it gets the value polymodal multiplies by
    state["alignment.logit_scale"] = alignment.logit_scale.detach().clamp(0, alignment.max_logit_scale)
    state = polymodal_to_hf(state, model_type)
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        hf_config.save_pretrained(tmp)
        save_state_dict(state, tmp / "model.safetensors")
        processor.save_pretrained(tmp)
        _save_tokenizer(config, tmp)
    return Path(destination)


def _image_processor_kwargs(config) -> dict:
    """The image processor arguments that reproduce the model's image preprocessing."""
    spec = config.input_spec("image")
    height, width = spec.image_size
    kwargs = {"image_mean": list(spec.mean), "image_std": list(spec.std), "resample": HF_RESAMPLE[spec.interpolation]}
    if spec.resize_mode == "squash":
        return {**kwargs, "size": {"height": height, "width": width}, "do_center_crop": False}
    if spec.resize_mode == "shortest" and height == width:
        crop = {"height": height, "width": width}
        return {**kwargs, "size": {"shortest_edge": height}, "crop_size": crop, "do_center_crop": True}
    raise CheckpointError(
        f"Hugging Face image processors cannot resize as preprocess.resize_mode={spec.resize_mode!r} at image size "
        f"{spec.image_size} does; expected 'squash', or 'shortest' at a square size"
    )


def _save_tokenizer(config, directory: Path) -> None:
    """Write the files ``AutoTokenizer`` / ``AutoProcessor`` read for the model's tokenizer, padding to its context."""
    if config.tokenizer is None:
        return
    tokenizer = get_tokenizer(config)
    if isinstance(tokenizer, HFTokenizer):
        hf_tokenizer = tokenizer.tokenizer
    else:  # the built-in CLIP BPE: the same vocabulary, in the files transformers' CLIPTokenizer reads
        from transformers import CLIPTokenizer as TransformersCLIPTokenizer

        write_clip_vocabulary(tokenizer, directory)
        hf_tokenizer = TransformersCLIPTokenizer.from_pretrained(str(directory))
    hf_tokenizer.model_max_length = tokenizer.context_length
    hf_tokenizer.save_pretrained(str(directory))


def write_clip_vocabulary(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """Write ``tokenizer``'s BPE as the ``vocab.json`` and ``merges.txt`` of Hugging Face's ``CLIPTokenizer``.

    The ids are polymodal's; only the two special tokens are spelled as transformers spells them. Texts then
    tokenize to the same ids up to the end-of-text token: transformers pads with end-of-text where polymodal
    pads with 0, which a causal text tower pooled at end-of-text does not see.
    """
    hf_special = {tokenizer.sot_token_id: "<|startoftext|>", tokenizer.eot_token_id: "<|endoftext|>"}
    vocab = {hf_special.get(i, symbol): i for symbol, i in tokenizer.encoder.items()}
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.__getitem__)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def export_open_clip(model: nn.Module, destination: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write open_clip weights: a directory (``open_clip.create_model('local-dir:DIR')`` loads it) or,
    when ``destination`` ends in ``.safetensors``/``.pt``/``.bin``, a bare state-dict file."""
    config = _config(model)
    model_cfg = open_clip_model_cfg(config)
    state = polymodal_to_open_clip(model.state_dict(), config)
    destination = Path(destination)
    if destination.suffix in (".safetensors", ".pt", ".bin", ".pth"):
        with atomic_file(destination, overwrite=overwrite) as tmp:
            if destination.suffix == ".safetensors":
                save_state_dict(state, tmp)
            else:
                torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        return destination
    pre = config.preprocess
    preprocess_cfg = {k: v for k, v in (("mean", pre.mean), ("std", pre.std)) if v is not None}
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        (tmp / OPEN_CLIP_CONFIG).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
        )
        save_state_dict(state, tmp / OPEN_CLIP_WEIGHTS)
    return destination


def export_model(model: nn.Module, destination: str | os.PathLike, to: str, overwrite: bool = False) -> Path:
    """Write ``model`` as ``to`` (one of ``EXPORT_FORMATS``)."""
    if to == "polymodal":
        return model.save_pretrained(destination, overwrite=overwrite)
    if to == "hf":
        return export_hf(model, destination, overwrite=overwrite)
    if to == "open_clip":
        return export_open_clip(model, destination, overwrite=overwrite)
    raise ValueError(f"unknown export format {to!r}; expected one of {EXPORT_FORMATS}")
