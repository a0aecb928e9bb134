"""Writing a polymodal model in foreign formats: Hugging Face CLIP directories and open_clip checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from polymodal.fileio import atomic_directory, atomic_file

from .checkpoint import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, CheckpointError, save_state_dict
from .convert import hf_config_from, open_clip_model_cfg, polymodal_to_hf, polymodal_to_open_clip

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
    """Write a Hugging Face ``CLIPModel`` directory (config, weights, image processor) for this model."""
    from transformers import CLIPConfig, CLIPImageProcessor

    config = _config(model)
    hf_config = CLIPConfig(**hf_config_from(config))
    state = polymodal_to_hf(model.state_dict())
    pre = config.preprocess
    size = config.input_spec("image").image_size[0]  # HF CLIP is square: hf_config_from refused anything else
    processor_kwargs = {k: v for k, v in (("image_mean", pre.mean), ("image_std", pre.std)) if v is not None}
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        hf_config.save_pretrained(tmp)
        save_state_dict(state, tmp / "model.safetensors")
        CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **processor_kwargs
        ).save_pretrained(tmp)
    return Path(destination)


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
