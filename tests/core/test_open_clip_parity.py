"""Weights made by open_clip (random, built here) load into polymodal and give the same embeddings."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import polymodal
from polymodal import create_model, export_model, from_pretrained


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic off its initial value, so a swapped or missed key shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def save_as(state: dict, path, style: str) -> None:
    if style == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif style == "wrapped_pt":  # as open_clip's trainer writes: a dict with "state_dict" and DDP prefixes
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)


TEXTS = ["a photo of a cat", "", "an extremely long caption " * 20, "日本語 & émoji 🐈"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "oc_name, pm_name, style",
    [
        ("ViT-B-32", "clip-vit-b-32", "wrapped_pt"),
        ("ViT-B-16", "clip-vit-b-16", "safetensors"),
        ("RN50", "clip-rn50", "bin"),
    ],
)
def test_open_clip_checkpoint_parity(tmp_path, oc_name, pm_name, style):
    torch.manual_seed(0)
    ref = perturbed(open_clip.create_model(oc_name, pretrained=None))
    suffix = {"wrapped_pt": ".pt", "safetensors": ".safetensors", "bin": ".bin"}[style]
    path = tmp_path / f"weights{suffix}"
    save_as(ref.state_dict(), path, style)

    model = create_model(pm_name, pretrained=path).eval()
    images = torch.randn(2, 3, 224, 224)
    text = open_clip.get_tokenizer(oc_name)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(text), ref.encode_text(text), rtol=0, atol=1e-5)
        # polymodal's own tokenizer produces the same ids
        torch.testing.assert_close(polymodal.get_tokenizer(pm_name)(TEXTS), text)
        assert model.alignment.logit_scale.item() == ref.logit_scale.item()


@pytest.mark.parametrize("image_tower", ["vit", "modified_resnet"])
def test_round_trip_polymodal_open_clip_polymodal(tmp_path, image_tower):
    overrides = {}
    name = "clip-vit-tiny"
    if image_tower == "modified_resnet":
        overrides["image"] = {}
        cfg = polymodal.get_model_config(name)
        cfg.towers["image"] = polymodal.ComponentConfig(
            "modified_resnet",
            {"layers": [1, 1, 1, 1], "width": 16, "heads": 4, "image_size": 64, "output_dim": 128},
        )
        cfg.preprocess.image_size = None  # the tower's image_size is the one fact
        name = cfg
    model = create_model(name, pretrained=None).eval()
    perturbed(model)
    export_model(model, tmp_path / "oc", to="open_clip")
    # open_clip itself loads the export and agrees
    ref = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    size = model.config.towers["image"].args["image_size"]
    images = torch.randn(2, 3, size, size)
    text = polymodal.get_tokenizer(model)(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ref.encode_image(images), model.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(ref.encode_text(text), model.encode_text(text), rtol=0, atol=1e-5)
    # and back: exactly the same tensors
    again = from_pretrained(tmp_path / "oc")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a bare open_clip state-dict file also round-trips through create_model
    export_model(model, tmp_path / "oc.safetensors", to="open_clip")
    again = create_model(name, pretrained=tmp_path / "oc.safetensors")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())


def test_quick_gelu_checkpoint_needs_matching_activation(tmp_path):
    ref = perturbed(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None))
    ref.visual.transformer.resblocks = ref.visual.transformer.resblocks[:1]
    ref.transformer.resblocks = ref.transformer.resblocks[:1]
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    overrides = dict(image={"layers": 1}, text={"layers": 1})
    model = create_model("clip-vit-b-32", pretrained=tmp_path / "w.safetensors", quick_gelu=True, **overrides).eval()
    images, text = torch.randn(1, 3, 224, 224), open_clip.get_tokenizer("ViT-B-32")(["a dog"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(text), ref.encode_text(text), rtol=0, atol=1e-5)
