import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from polymodal.encoders.timm_encoder import TimmEncoder

VIT = {"model_name": "test_vit", "image_size": 32}


def _image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _save(model: nn.Module, path) -> str:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("pool_type", ["token", "avg"])
def test_vit_shapes_and_pooling(pool_type):
    torch.manual_seed(0)
    enc = TimmEncoder(**VIT, output_dim=16, pool_type=pool_type).eval()
    x = _image(2, 3, 32, 32)
    tokens = enc.forward_features(x)
    assert enc.width == 64 and enc.output_dim == 16 and enc.modality == "image"
    assert tokens.shape == (2, 1 + 2 * 2, 64)  # class token + (32 / 16)^2 patches
    pooled = tokens[:, 0] if pool_type == "token" else tokens[:, 1:].mean(1)
    with torch.no_grad():
        pooled = enc.trunk.fc_norm(pooled)  # timm normalises after averaging (identity for "token")
        torch.testing.assert_close(enc(x), enc.proj(pooled))


@pytest.mark.parametrize(("name", "channels_last"), [("test_resnet", False), ("test_mambaout", True)])
def test_feature_maps_become_tokens(name, channels_last):
    torch.manual_seed(0)
    enc = TimmEncoder(name, output_dim=16).eval()
    x = _image(2, 3, 64, 64)
    with torch.no_grad():
        fmap = enc.trunk.forward_features(x)
        tokens = enc.forward_features(x)
        expected = fmap.flatten(1, 2) if channels_last else fmap.flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, expected)
        assert tokens.shape == (2, 4, enc.width)
        pooled = enc.trunk.forward_head(fmap, pre_logits=True)
        torch.testing.assert_close(enc(x), enc.proj(pooled))
    assert enc(x).shape == (2, 16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_reproduce_source_model(tmp_path, suffix):
    torch.manual_seed(1)
    # the source keeps a 10-class classifier; its weights must be ignored when loading
    source = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).eval()
    path = _save(source, tmp_path / f"vit{suffix}")
    torch.manual_seed(2)  # different random init, so equality can only come from the file
    enc = TimmEncoder(**VIT, proj=None, output_dim=None, pretrained_path=path).eval()
    x = _image(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), source.forward_features(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(enc(x), source.forward_head(source.forward_features(x), pre_logits=True))
    assert enc.output_dim == 64


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    enc = TimmEncoder("test_resnet", proj=None, output_dim=None, pretrained_path=str(path)).eval()
    x = _image(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), source(x))


def test_bad_weights_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TimmEncoder(**VIT, pretrained_path=str(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        TimmEncoder(**VIT, pretrained_path=str(broken))
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    state = source.state_dict()
    del state["cls_token"]
    state["blocks.99.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 7, 64)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(
        ValueError,
        match=r"missing keys: cls_token; unexpected keys: blocks\.99\.weight; "
        r"shape mismatches: pos_embed \(checkpoint \(1, 7, 64\), model \(1, 5, 64\)\)",
    ):
        TimmEncoder(**VIT, pretrained_path=str(path))


def test_projection_variants():
    x = _image(2, 3, 32, 32)
    torch.manual_seed(0)
    mlp = TimmEncoder(**VIT, output_dim=8, proj="mlp")
    assert mlp(x).shape == (2, 8) and isinstance(mlp.proj, nn.Sequential)
    assert TimmEncoder(**VIT, proj=None, output_dim=None)(x).shape == (2, 64)
    # MambaOut's head widens pooled features: proj=None reports that width
    assert TimmEncoder("test_mambaout", proj=None, output_dim=None).output_dim == 256
    with pytest.raises(ValueError, match="proj=None keeps"):
        TimmEncoder(**VIT, proj=None, output_dim=8)
    with pytest.raises(ValueError, match="proj must be"):
        TimmEncoder(**VIT, proj="conv")
    with pytest.raises(ValueError, match="unknown timm model"):
        TimmEncoder("no_such_model_anywhere")


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    enc = TimmEncoder(**VIT, output_dim=8, proj="mlp", proj_bias=True).train()
    enc(_image(2, 3, 32, 32)).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_output_and_gradients():
    torch.manual_seed(0)
    enc = TimmEncoder(**VIT, output_dim=8).train()
    x = _image(2, 3, 32, 32)
    runs = []
    for enable in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(enable)
        out = enc(x)
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    assert enc.trunk.grad_checkpointing
    torch.testing.assert_close(runs[1][0], runs[0][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, msg=name)


def test_bad_input_raises():
    torch.manual_seed(0)
    enc = TimmEncoder("vit_tiny_patch16_224", image_size=32, output_dim=8)
    with pytest.raises(ValueError, match=r"4-D tensor of shape \(B, 3, 32, 32\)"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"size 3 in dimension 1"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expects shape \(B, 3, 32, 32\).*image_size="):
        enc.forward_features(torch.randn(1, 3, 48, 48))


def test_in_chans_and_drop_path():
    enc = TimmEncoder("test_resnet", in_chans=1, drop_path=0.1, output_dim=8)
    assert enc(torch.randn(2, 1, 64, 64)).shape == (2, 8)
    assert any(type(m).__name__ == "DropPath" for m in enc.modules())


def test_lock_leaves_only_last_groups_trainable():
    enc = TimmEncoder(**VIT, output_dim=8)
    groups = enc.layer_groups()
    assert sum(len(g) for g in groups) == len(list(enc.parameters()))
    enc.lock(unlocked_layers=1)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"proj.weight"}
    enc.lock(unlocked_layers=2)  # timm groups the final norm with the last block
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in enc.named_parameters() if n == "proj.weight" or n.startswith(("trunk.blocks.5.", "trunk.norm."))
    }
    assert "trunk.norm.weight" in trainable and "trunk.blocks.4.norm1.weight" not in trainable


def test_proj_head_uses_timms_classifier_as_the_projection() -> None:
    torch.manual_seed(0)
    enc = TimmEncoder(**VIT, output_dim=24, proj="head").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 24) and enc.output_dim == 24
        torch.testing.assert_close(out, enc.trunk(x), rtol=0, atol=0)  # timm's own classifier forward
    assert not any(isinstance(m, torch.nn.Linear) for m in enc.proj.modules())
    with pytest.raises(ValueError, match="give output_dim"):
        TimmEncoder(**VIT, output_dim=None, proj="head")
