"""Parity of every importable model family, at its default (full-size) config, with random weights built here.

    python benchmarks/import_parity.py            # every family (a few minutes on 2 CPU cores)
    python benchmarks/import_parity.py --only siglip convnext

For each family the reference library builds its default model with random weights (moved off their
initial values, so a missed or swapped key shows), saves it in its own format, and polymodal imports the
directory with ``polymodal.from_pretrained``. Printed: the largest absolute difference, in fp32, between
the reference's and polymodal's image embeddings, text embeddings (before normalisation) and, where the
family has them, logits. The README's table of importable families is this script's output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from machine import describe_machine
from safetensors.torch import save_file

GENERATOR_SEED = 7


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns an output object


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def text_ids(vocab: int, length: int, pad: int, first: int | None = None, eos: int | None = None) -> torch.Tensor:
    """Two rows of random ids: one padded after 7 tokens, one filling the context."""
    g = torch.Generator().manual_seed(GENERATOR_SEED)
    ids = torch.randint(3, vocab - 2, (2, length), generator=g)
    if eos is not None:
        ids[0, 6], ids[1, -1] = eos, eos
    ids[0, 7:] = pad
    if first is not None:
        ids[:, 0] = first
    return ids


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(GENERATOR_SEED))


# ------------------------------------------------------------------------------------------ open_clip


def open_clip_directory(ref, model_cfg: dict, directory: Path) -> Path:
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def open_clip_family(name: str, cfg_edit: Callable[[dict, Path], dict] | None = None):
    def run(tmp: Path) -> dict[str, float]:
        import open_clip
        from open_clip.model import CLIP, CustomTextCLIP

        import polymodal

        cfg = open_clip.get_model_config(name)
        if cfg_edit is not None:
            cfg = cfg_edit(cfg, tmp)
        torch.manual_seed(0)
        cls = CustomTextCLIP if cfg.get("custom_text") else CLIP
        ref = perturbed(cls(**{k: v for k, v in cfg.items() if k != "custom_text"}))
        model = polymodal.from_pretrained(open_clip_directory(ref, cfg, tmp / "oc")).eval()
        size = cfg["vision_cfg"].get("image_size", 224)
        text = cfg["text_cfg"]
        if text.get("hf_model_name"):
            ids = text_ids(model.towers["text"].vocab_size, 77, pad=1, first=0)
        else:
            vocab = text.get("vocab_size", 49408)
            eos = 49407 if vocab == 49408 else None  # CLIP's end-of-text; SigLIP's vocabulary pools the last position
            ids = text_ids(vocab, text.get("context_length", 77), pad=0, eos=eos)
        x = images(size)
        with torch.no_grad():
            return {
                "image": max_diff(model.encode_image(x), ref.encode_image(x)),
                "text": max_diff(model.encode_text(ids), ref.encode_text(ids)),
            }

    return run


def coca(tmp: Path) -> dict[str, float]:
    """open_clip's CoCa as polymodal's captioner: its contrastive embeddings (the captions themselves are
    compared token for token in tests/core/test_coca_parity.py)."""
    import open_clip

    import polymodal

    torch.manual_seed(0)
    ref = open_clip.create_model("coca_ViT-B-32", pretrained=None)
    with torch.no_grad():  # open_clip leaves this projection uninitialised (torch.empty)
        ref.text_decoder.text_projection.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    ref = perturbed(ref)
    model = polymodal.from_pretrained(open_clip_directory(ref, open_clip.get_model_config("coca_ViT-B-32"), tmp / "oc"))
    model = model.eval()
    x, ids = images(224), text_ids(49408, 76, pad=0, first=49406, eos=49407)
    with torch.no_grad():
        return {
            "image": max_diff(model.encode_image(x), ref.encode_image(x, normalize=False)),
            "text": max_diff(model.encode_text(ids), ref.encode_text(ids, normalize=False)),
        }


def roberta_text(cfg: dict, tmp: Path) -> dict:
    from transformers import RobertaConfig

    RobertaConfig().save_pretrained(tmp / "roberta-base")  # roberta-base's architecture: transformers' defaults
    cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": str(tmp / "roberta-base"), "hf_model_pretrained": False}
    return {**cfg, "custom_text": True}


# ------------------------------------------------------------------------------------- Hugging Face


def hf_family(kind: str):
    def run(tmp: Path) -> dict[str, float]:
        import transformers

        import polymodal

        torch.manual_seed(0)
        if kind == "clip":
            ref = perturbed(transformers.CLIPModel(transformers.CLIPConfig()))
        elif kind == "siglip":
            ref = perturbed(transformers.SiglipModel(transformers.SiglipConfig()))
        else:
            ref = perturbed(transformers.Siglip2Model(transformers.Siglip2Config()))
        ref.save_pretrained(tmp / "hf")
        model = polymodal.from_pretrained(tmp / "hf").eval()
        size = model.config.input_spec("image").image_size[0]
        x = images(size)
        text_cfg = ref.config.text_config
        if kind == "clip":
            ids = text_ids(text_cfg.vocab_size, 77, pad=text_cfg.pad_token_id, eos=text_cfg.eos_token_id)
        else:  # SigLIP pads with its end-of-text id to the fixed context
            ids = text_ids(text_cfg.vocab_size, text_cfg.max_position_embeddings, pad=1)
        pixel_inputs = {"pixel_values": x}
        if kind == "siglip2":
            from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

            patch = ref.config.vision_config.patch_size
            grid = size // patch
            pixel_inputs = {
                "pixel_values": torch.stack([convert_image_to_patches(im, patch) for im in x]),
                "pixel_attention_mask": torch.ones(2, grid * grid, dtype=torch.long),
                "spatial_shapes": torch.tensor([[grid, grid]] * 2),
            }
        with torch.no_grad():
            out = ref(input_ids=ids, **pixel_inputs)
            ours = model(image=x, text=ids)
            if kind == "clip":  # the projected features, before normalisation
                image_ref = features(ref.get_image_features(pixel_values=x))
                text_ref = features(ref.get_text_features(input_ids=ids))
            else:  # SigLIP's towers end in their pooled heads, with no separate projection
                image_ref, text_ref = out.vision_model_output.pooler_output, out.text_model_output.pooler_output
            diffs = {
                "image": max_diff(model.encode_image(x), image_ref),
                "text": max_diff(model.encode_text(ids), text_ref),
            }
            logits = ours.logit_scale * ours.embeddings["image"] @ ours.embeddings["text"].t()
            if ours.logit_bias is not None:
                logits = logits + ours.logit_bias
            diffs["logits"] = max_diff(logits, out.logits_per_image)
        return diffs

    return run


FAMILIES: dict[str, tuple[str, Callable[[Path], dict[str, float]]]] = {
    "openclip-vit": ("open_clip ViT-B-32 (plain ViT)", open_clip_family("ViT-B-32")),
    "openclip-resnet": ("open_clip RN50 (modified ResNet)", open_clip_family("RN50")),
    "convnext": ("open_clip convnext_base (timm image tower)", open_clip_family("convnext_base")),
    "openclip-siglip": ("open_clip ViT-B-16-SigLIP (timm MAP tower, custom text)", open_clip_family("ViT-B-16-SigLIP")),
    "roberta": ("open_clip roberta-ViT-B-32 (HF text tower)", open_clip_family("roberta-ViT-B-32", roberta_text)),
    "coca": ("open_clip coca_ViT-B-32 (captioner)", coca),
    "hf-clip": ("Hugging Face CLIPModel (CLIPConfig())", hf_family("clip")),
    "siglip": ("Hugging Face SiglipModel (SiglipConfig())", hf_family("siglip")),
    "siglip2": ("Hugging Face Siglip2Model at its native grid (Siglip2Config())", hf_family("siglip2")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="families to run (default: all)")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    print(f"{'family':<62}{'image':>10}{'text':>10}{'logits':>10}   (max abs difference, fp32)")
    worst = 0.0
    for key in args.only or FAMILIES:
        label, run = FAMILIES[key]
        with tempfile.TemporaryDirectory() as tmp:
            diffs = run(Path(tmp))
        worst = max(worst, *diffs.values())
        cells = "".join(f"{diffs[k]:>10.1e}" if k in diffs else f"{'-':>10}" for k in ("image", "text", "logits"))
        print(f"{label:<62}{cells}", flush=True)
    print(f"largest difference {worst:.1e} ({'within' if worst <= 1e-4 else 'NOT within'} the 1e-4 goal)")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
