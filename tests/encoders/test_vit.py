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


@pytest.mark.parametrize("pool_type", ["cls", "mean", "map"])
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


def siglip_vit(**kw):
    return tiny_vit(pool_type="map", class_token=False, pre_norm=False, patch_bias=True, output_dim=None, **kw)


def test_attention_pool_head_is_a_probe_over_the_tokens_and_a_residual_mlp():
    m = siglip_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 32) and m(x).shape == (2, 32) and m.output_dim == 32 and m.proj is None
    head = m.attn_pool
    q = head.probe[None, None].expand(2, 1, 32)
    pooled = torch.nn.functional.multi_head_attention_forward(  # torch's own MHA, separate from Attention
        q.transpose(0, 1),
        tokens.transpose(0, 1),
        tokens.transpose(0, 1),
        32,
        2,
        torch.cat([head.attn.q.weight, head.attn.kv.weight]),
        torch.cat([head.attn.q.bias, head.attn.kv.bias]),
        None,
        None,
        False,
        0.0,
        head.attn.proj.weight,
        head.attn.proj.bias,
        training=False,
        need_weights=False,
    )[0].transpose(0, 1)  # (B, 1, width)
    expected = (pooled + head.mlp(head.norm(pooled)))[:, 0]
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-6)
    # every token reaches the pooled embedding; the patch embedding has a bias
    assert m.patch_embed.bias is not None and isinstance(m.norm_pre, torch.nn.Identity)


def test_attention_pool_parameters_get_gradients_and_sit_in_the_head_group():
    m = siglip_vit()
    assert_all_params_get_grad(m, m(torch.randn(2, 3, 32, 32)).square().sum())
    assert {id(p) for p in m.attn_pool.parameters()} <= {id(p) for p in m.layer_groups()[-1]}


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


def test_query_pool_is_cocas_attentional_pooler():
    m = tiny_vit(pool_type="queries", pool_queries=5, pool_heads=4, pool_dim=24).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_features(x)
    pooled, rest = m.pool_with_tokens(tokens)
    assert pooled.shape == (2, 24) and rest.shape == (2, 4, 24) and m(x).shape == (2, 16) and m.pool_dim == 24
    head = m.attn_pool
    # torch's own MultiheadAttention with keys and values from the 32-wide tokens, as open_clip's pooler has it
    mha = torch.nn.MultiheadAttention(24, 4, kdim=32, vdim=32, batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(head.attn.q.weight)
        k, v = head.attn.kv.weight.chunk(2)
        mha.k_proj_weight.copy_(k)
        mha.v_proj_weight.copy_(v)
        mha.in_proj_bias.copy_(torch.cat([head.attn.q.bias, head.attn.kv.bias]))
        mha.out_proj.load_state_dict({"weight": head.attn.proj.weight, "bias": head.attn.proj.bias})
        queries = head.norm_q(head.queries).expand(2, -1, -1)
        expected = head.norm(mha(queries, tokens, tokens, need_weights=False)[0])  # (2, 5, 24)
    torch.testing.assert_close(torch.cat([pooled[:, None], rest], dim=1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), m.proj(expected[:, 0]), rtol=0, atol=1e-6)


def test_query_pool_learns_checkpoints_and_sits_in_the_head_group():
    m = tiny_vit(pool_type="queries", pool_queries=3, pool_dim=24)
    x = torch.randn(2, 3, 32, 32)
    assert_all_params_get_grad(m, m(x).square().sum())
    assert {id(p) for p in m.attn_pool.parameters()} <= {id(p) for p in m.layer_groups()[-1]}
    m.zero_grad(set_to_none=True)
    assert_checkpointing_matches(m, lambda: m(x))
    with pytest.raises(ValueError, match="pool_dim=24 applies to pool_type='queries' only"):
        tiny_vit(pool_dim=24)


def test_pool_with_tokens_gives_the_patch_tokens_beside_a_pooled_class_token():
    m = tiny_vit().eval()
    tokens = m.forward_features(torch.randn(2, 3, 32, 32))
    pooled, rest = m.pool_with_tokens(tokens)
    assert torch.equal(pooled, tokens[:, 0]) and torch.equal(rest, tokens[:, 1:])
