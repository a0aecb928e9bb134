import pytest
import torch
import torchvision
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import save_file
from torch import nn

from polymodal.encoders.resnet import ResNetEncoder, TorchvisionResNetEncoder
from polymodal.encoders.vit import resample_pos_embed

TINY = {"layers": (1, 1, 1, 1), "output_dim": 32, "heads": 4, "image_size": 64, "width": 8}


def _randomise_norms(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running stats (bn3 starts at zero)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def _open_clip_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    a = "attnpool."
    out = {k: v for k, v in state.items() if not k.startswith(a)}
    out[a + "pos_embed"] = state[a + "positional_embedding"]
    for kind in ("weight", "bias"):
        out[a + "qkv." + kind] = torch.cat([state[f"{a}{p}_proj.{kind}"] for p in "qkv"])
        out[a + "proj." + kind] = state[f"{a}c_proj.{kind}"]
    return out


def _tiny(**kw) -> ResNetEncoder:
    torch.manual_seed(0)
    model = ResNetEncoder(**{**TINY, **kw})
    _randomise_norms(model)
    with torch.no_grad():
        model.attnpool.qkv.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def reference_pair() -> tuple[ModifiedResNet, ResNetEncoder]:
    torch.manual_seed(0)
    ref = ModifiedResNet(**TINY)
    _randomise_norms(ref)
    with torch.no_grad():
        for name, p in ref.attnpool.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    ours = ResNetEncoder(**TINY)
    ours.load_state_dict(_open_clip_to_ours(ref.state_dict()), strict=True)
    return ref, ours


def test_state_dict_keys_match_open_clip_except_attnpool(reference_pair):
    ref, ours = reference_pair
    ref_keys = {k for k in ref.state_dict() if not k.startswith("attnpool.")}
    our_keys = {k for k in ours.state_dict() if not k.startswith("attnpool.")}
    assert ref_keys == our_keys
    assert "layer2.0.downsample.0.weight" in our_keys and "layer2.0.downsample.1.running_var" in our_keys
    attn = {k for k in ours.state_dict() if k.startswith("attnpool.")}
    assert attn == {
        "attnpool.pos_embed",
        "attnpool.qkv.weight",
        "attnpool.qkv.bias",
        "attnpool.proj.weight",
        "attnpool.proj.bias",
    }


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_open_clip(reference_pair, train):
    ref, ours = reference_pair
    ref.train(train)
    ours.train(train)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        expected_map = ref.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
        got = ours(x)
        tokens = ours.forward_features(x)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, expected_map.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    ref.eval()
    ours.eval()


def test_shapes_and_attributes():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.modality == "image" and model.width == 8 * 32 and model.output_dim == 32
    assert model.forward_features(x).shape == (2, 4, 256)  # 64 / 32 = 2 -> 2 x 2 tokens
    assert model(x).shape == (2, 32)


def test_every_parameter_gets_a_gradient():
    model = _tiny().train()
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_output_gradients_and_norm_stats():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    results = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        stats = {n: b.clone() for n, b in model.named_buffers()}
        results.append((out.detach(), grads, stats))
    (out0, grads0, stats0), (out1, grads1, stats1) = results
    torch.testing.assert_close(out1, out0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)
    # the recomputation in backward must not fold the batch into the running stats a second time
    for name in stats0:
        torch.testing.assert_close(stats1[name], stats0[name], msg=name)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(3, 64, 64), r"4-D tensor of shape \(B, 3, H, W\)"),
        (torch.randn(2, 1, 64, 64), r"size 3 in dimension 1"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.long), "floating-point"),
        (torch.randn(2, 3, 16, 64), r"H, W >= 32"),
    ],
)
def test_bad_input_raises(x, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(x)


def test_other_and_non_square_input_sizes():
    model = _tiny().eval()
    x = torch.randn(2, 3, 96, 64)
    assert model.forward_features(x).shape == (2, 3 * 2, 256)
    out = model(x)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    # a model built for that size has a matching table and needs no interpolation
    rect = _tiny(image_size=(96, 64)).eval()
    assert rect.attnpool.pos_embed.shape == (1 + 3 * 2, 256)
    assert rect(x).shape == (2, 32)


def test_pos_embed_interpolation_matches_resampled_table():
    model = _tiny().eval()
    x = torch.randn(1, 3, 128, 128)  # 4 x 4 grid vs the 2 x 2 table
    big = _tiny(image_size=128).eval()
    big.load_state_dict({k: v for k, v in model.state_dict().items() if k != "attnpool.pos_embed"}, strict=False)
    with torch.no_grad():
        big.attnpool.pos_embed.copy_(resample_pos_embed(model.attnpool.pos_embed, (2, 2), (4, 4), 1))
        torch.testing.assert_close(model(x), big(x))


def test_in_chans():
    model = _tiny(in_chans=1).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 32)


def test_lock_leaves_only_last_group_trainable():
    model = _tiny()
    groups = model.layer_groups()
    assert len(groups) == 6
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    model.lock(unlocked_layers=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.attnpool.named_parameters(prefix="attnpool")}
    model.lock(unlocked_layers=0)
    assert not any(p.requires_grad for p in model.parameters())


# torchvision backbone


def _torchvision_weights(tmp_path, suffix: str) -> tuple[nn.Module, str]:
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    _randomise_norms(ref)
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return ref.eval(), str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_loads_local_weights(tmp_path, suffix):
    ref, path = _torchvision_weights(tmp_path, suffix)
    model = TorchvisionResNetEncoder("resnet18", output_dim=16, weights_path=path).eval()
    x = torch.randn(2, 3, 32, 32)
    trunk = nn.Sequential(*list(ref.children())[:-2])  # everything up to layer4
    with torch.no_grad():
        fmap = trunk(x)
        torch.testing.assert_close(model.forward_features(x), fmap.flatten(2).transpose(1, 2))
        torch.testing.assert_close(model(x), model.proj(fmap.mean(dim=(2, 3))))
    assert model.width == 512 and model(x).shape == (2, 16)


def test_torchvision_bad_weights_list_keys(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"missing keys.*bn1\.weight.*unexpected keys.*extra\.weight"):
        TorchvisionResNetEncoder("resnet18", weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TorchvisionResNetEncoder("resnet18", weights_path=str(tmp_path / "nope.pth"))


def test_torchvision_attention_pool_gradients_and_lock():
    torch.manual_seed(0)
    model = TorchvisionResNetEncoder("resnet18", output_dim=16, pool_type="attn", image_size=32, in_chans=1)
    _randomise_norms(model)
    model.train()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 16)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.lock(unlocked_layers=1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.pool.named_parameters(prefix="pool")
    }


def test_torchvision_grad_checkpointing_same_output():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    outs, grads = [], []
    for enable in (False, True):
        torch.manual_seed(0)
        model = TorchvisionResNetEncoder("resnet18", output_dim=16).train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(model.trunk.layer1[0].conv1.weight.grad.clone())
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_torchvision_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pool_type"):
        TorchvisionResNetEncoder("resnet18", pool_type="max")
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        TorchvisionResNetEncoder("squeezenet1_0")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        TorchvisionResNetEncoder("resnet_does_not_exist")


def test_layer_arguments_and_bad_configs():
    model = ResNetEncoder(**{**TINY, "norm_layer": lambda c: nn.GroupNorm(1, c), "act_layer": "silu"}).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    with pytest.raises(ValueError, match="grid"):
        ResNetEncoder(**{**TINY, "image_size": 16})
    with pytest.raises(ValueError, match="divisible by the number of heads"):
        ResNetEncoder(**{**TINY, "heads": 3})
    with pytest.raises(ValueError, match="4 stages"):
        ResNetEncoder(**{**TINY, "layers": (1, 1, 1)})
