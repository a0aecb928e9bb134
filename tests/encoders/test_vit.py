import pytest
import torch

from polymodal.encoders import VisionTransformer
from tests.helpers import assert_all_params_get_grad, assert_checkpointing_matches


def tiny_vit(**kw):
    args = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, output_dim=16)
    return VisionTransformer(**{**args, **kw})


def test_shapes_and_interface():
    m = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 16)
    assert m.forward_features(x).shape == (2, 1 + 16, 32)
    assert (m.output_dim, m.width, m.modality) == (16, 32, "image")


def test_every_parameter_gets_gradient():
    m = tiny_vit()
    assert_all_params_get_grad(m, m(torch.randn(2, 3, 32, 32)).square().sum())


@pytest.mark.parametrize("pool_type", ["cls", "mean"])
def test_grad_checkpointing_same_output(pool_type):
    m = tiny_vit(pool_type=pool_type, drop=0.0)
    x = torch.randn(2, 3, 32, 32)
    assert_checkpointing_matches(m, lambda: m(x))


def test_mean_pooling_without_class_token():
    m = tiny_vit(pool_type="mean", class_token=False).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(m(x), m.proj(tokens.mean(1)))


def test_one_channel_non_square_spectrogram_vit():
    m = tiny_vit(image_size=(16, 48), patch_size=(8, 8), in_chans=1, modality="audio")
    out = m(torch.randn(3, 1, 16, 48))
    assert out.shape == (3, 16) and m.modality == "audio"


def test_other_input_size_interpolates_positions():
    m = tiny_vit().eval()
    x = torch.randn(1, 3, 48, 40)
    assert m.forward_features(x).shape == (1, 1 + 6 * 5, 32)
    # resizing the table permanently gives the same result as on-the-fly interpolation
    before = m(x)
    m.set_image_size((48, 40))
    assert m.pos_embed.shape == (1 + 30, 32)
    torch.testing.assert_close(m(x), before)


def test_resample_at_same_size_is_identity():
    m = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    before = m(x)
    m.set_image_size(32)
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)


def test_patch_dropout_only_in_training():
    m = tiny_vit(patch_dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    assert m.forward_features(x).shape == (2, 1 + 8, 32)
    m.eval()
    assert m.forward_features(x).shape == (2, 1 + 16, 32)


def test_quick_gelu_changes_output():
    torch.manual_seed(0)
    a = tiny_vit(act_layer="gelu").eval()
    b = tiny_vit(act_layer="quick_gelu").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(3, 32, 32), r"4-D tensor of shape \(B, 3, H, W\)"),
        (torch.randn(2, 1, 32, 32), r"size 3 in dimension 1"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (torch.randn(2, 3, 30, 32), "multiples of"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit()(x)


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        tiny_vit(image_size=30)
    with pytest.raises(ValueError, match="class_token"):
        tiny_vit(class_token=False, pool_type="cls")
    with pytest.raises(ValueError, match="activation"):
        tiny_vit(act_layer="swishy")


def test_lock_leaves_last_groups_trainable():
    m = tiny_vit()
    m.lock(unlocked_layers=1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"norm.weight", "norm.bias", "proj.weight"}
    m.lock(unlocked_layers=2)
    assert any(n.startswith("transformer.blocks.1.") for n, p in m.named_parameters() if p.requires_grad)
    assert not any(n.startswith("transformer.blocks.0.") for n, p in m.named_parameters() if p.requires_grad)


def test_bf16_autocast_runs():
    m = tiny_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
