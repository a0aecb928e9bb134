"""Export parity beyond the tiny models: the big registered shapes and models imported from open_clip
(ViT-B-32, RN50) and Hugging Face CLIP, built here with random weights. Each tower, exported as ONNX
(run by ONNX Runtime) and as a ``torch.export`` program, gives the *source library's* embeddings within
1e-4 at batch sizes 1 and 7. Blocks are cut to one per stage (as in ``test_torch_export``): every code
path stays, the minutes of exporting twelve-block towers go."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from polymodal import create_model, from_pretrained
from polymodal.convert_configs import tower_arg
from polymodal.deploy import DeployedModel, export_towers
from tests.core.test_hf_parity import features
from tests.core.test_open_clip_parity import perturbed
from tests.core.test_torch_export import text_ids

pytestmark = pytest.mark.slow


def _open_clip_dir(name: str, tmp_path):
    """An open_clip ``name`` with one block per stage, saved as open_clip's own directory layout."""
    cfg = open_clip.get_model_config(name)
    vision = dict(cfg["vision_cfg"], layers=[1, 1, 1, 1] if isinstance(cfg["vision_cfg"]["layers"], list) else 1)
    text = dict(cfg["text_cfg"], layers=1)
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text))
    out = tmp_path / "oc"
    out.mkdir()
    model_cfg = dict(cfg, vision_cfg=vision, text_cfg=text)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return ref, from_pretrained(out).eval()


def _hf(tmp_path):
    """Hugging Face CLIP at its default (ViT-B/32) widths, one block per tower."""
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"num_hidden_layers": 1}, vision_config={"num_hidden_layers": 1})
    ref = perturbed(CLIPModel(config))
    ref.save_pretrained(tmp_path / "hf")
    return ref, from_pretrained(tmp_path / "hf").eval()


def _inputs(model, modality: str, batch: int) -> torch.Tensor:
    spec = model.config.input_spec(modality)
    if modality == "image":
        return torch.randn(batch, 3, *spec.image_size, generator=torch.Generator().manual_seed(batch))
    return text_ids(batch, spec.context_length)[:, : 5 + batch]  # shorter than the context, end of text inside


def _reference(kind: str, ref, modality: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "open_clip":
            if modality == "image":
                return ref.encode_image(x)
            # open_clip takes full-context rows only; padding after end of text changes nothing (causal)
            return ref.encode_text(torch.nn.functional.pad(x, (0, ref.context_length - x.shape[1])))
        if kind == "hf":
            if modality == "image":
                return features(ref.get_image_features(pixel_values=x))
            return features(ref.get_text_features(input_ids=x, attention_mask=(x != 0).long()))
        return ref.encode(modality, x)


# clip-vit-b-32 and clip-rn50 are what open_clip's ViT-B-32 and RN50 import as, so those two cover
# the registered shapes too, checked against open_clip itself
SOURCES = ["clip-vit-b-16", "open_clip:ViT-B-32", "open_clip:RN50", "hf:clip"]


@pytest.mark.parametrize("source", SOURCES)
def test_exported_towers_equal_the_source_library(source, tmp_path):
    if source.startswith("open_clip:"):
        kind, (ref, model) = "open_clip", _open_clip_dir(source.split(":")[1], tmp_path)
    elif source == "hf:clip":
        kind, (ref, model) = "hf", _hf(tmp_path)
    else:
        torch.manual_seed(0)
        fewer = {"vit": {"layers": 1}, "modified_resnet": {"layers": [1, 1, 1, 1]}}
        image_type = create_model(source, device="meta").config.towers["image"].type
        kind, model = "polymodal", create_model(source, image=fewer[image_type], text={"layers": 1}).eval()
        ref = model
    if kind == "open_clip":
        registered = {"ViT-B-32": "clip-vit-b-32", "RN50": "clip-rn50"}[source.split(":")[1]]
        want = create_model(registered, device="meta").config.towers
        for modality, tower in model.config.towers.items():  # the registered shape, but for the block counts
            assert tower.type == want[modality].type
            names = (set(tower.args) | set(want[modality].args)) - {"layers"}
            assert all(tower_arg(tower, n) == tower_arg(want[modality], n) for n in names), modality
    for fmt in ("onnx", "torch-export"):
        deployed = DeployedModel.load(export_towers(model, tmp_path / fmt, fmt))
        for modality in ("image", "text"):
            for batch in (1, 7):
                x = _inputs(model, modality, batch)
                torch.testing.assert_close(
                    deployed.encode(modality, x), _reference(kind, ref, modality, x), atol=1e-4, rtol=0
                )
