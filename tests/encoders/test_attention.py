"""The one attention module: self- and cross-attention against ``nn.MultiheadAttention``, the key/value
cache against a full causal pass, and one MLP-width rule for every block that has an MLP."""

import pytest
import torch
from torch import nn

from polymodal.encoders import Attention, Block, CrossAttentionBlock, mlp_hidden_dim
from polymodal.encoders.resnet import AttentionPool2d
from polymodal.fusion import CrossAttentionFusion
from polymodal.tasks.captioning import CaptionDecoderBlock


def reference_for(attn: Attention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(attn.dim, attn.num_heads, batch_first=True).eval()
    with torch.no_grad():
        if attn.cross:
            ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
            ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            ref.in_proj_weight.copy_(attn.qkv.weight)
            ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    return ref


def test_self_attention_matches_multihead_attention_with_causal_and_padding_masks():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    ref = reference_for(attn)
    x = torch.randn(2, 6, 32)
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = masked, as MultiheadAttention takes it
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(attn(x, is_causal=True), expected, rtol=1e-5, atol=1e-5)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 3:] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(attn(x, attn_mask=keep[:, None, None, :]), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_matches_multihead_attention():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, cross=True).eval()
    ref = reference_for(attn)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 4:] = False
    expected, _ = ref(x, context, context, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(attn(x, context, attn_mask=keep[:, None, None, :]), expected, rtol=1e-5, atol=1e-5)
    block = CrossAttentionBlock(32, 4).eval()
    block.attn.load_state_dict(attn.state_dict())
    # the block's key padding mask is the same mask
    out = block(x, context, keep)
    manual = x + attn(block.norm_q(x), block.norm_kv(context), attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(out, manual + block.mlp(block.norm2(manual)), rtol=0, atol=0)


def test_split_projections_equal_the_fused_one():
    """``queries`` / ``keys_values`` of a self-attention read the same fused ``qkv`` weights."""
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn.queries(x), q)
    torch.testing.assert_close(attn.keys_values(x), (k, v))
    torch.testing.assert_close(attn.attend(attn.queries(x), *attn.keys_values(x)), attn(x))


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 1, 3], [4, 2]])
def test_key_value_cache_matches_one_causal_pass(chunks):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, sum(chunks), 32)
    full = attn(x, is_causal=True)
    past, outs, start = None, [], 0
    for n in chunks:
        out, past = attn.forward_cached(x[:, start : start + n], past)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)
    assert past[0].shape == (2, 4, sum(chunks), 8)


def test_attention_pool_is_the_mean_token_attending_over_all():
    torch.manual_seed(0)
    pool = AttentionPool2d(grid_size=2, embed_dim=16, num_heads=2, output_dim=12).eval()
    fmap = torch.randn(3, 16, 2, 2)
    tokens = fmap.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.pos_embed
    torch.testing.assert_close(pool(fmap), Attention.forward(pool, tokens)[:, 0], rtol=1e-5, atol=1e-6)


def test_misuse_is_named():
    with pytest.raises(ValueError, match="divisible by the number of heads"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="cross-attention needs context"):
        Attention(8, 2, cross=True)(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="self-attention takes no context"):
        Attention(8, 2)(torch.randn(1, 2, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="self-attention only"):
        Attention(8, 2, cross=True).forward_cached(torch.randn(1, 2, 8))


def test_every_block_sizes_its_mlp_by_one_rule():
    """32 * 3.99 = 127.68: the fusion blocks used to truncate to 127 while the others rounded to 128."""
    dim, ratio = 32, 3.99
    assert mlp_hidden_dim(dim, ratio) == 128
    fusion = CrossAttentionFusion("text", "image", dim=dim, heads=4, layers=1, input_dims={"text": 32, "image": 32},
                                  mlp_ratio=ratio)  # fmt: skip
    blocks = [
        Block(dim, 4, ratio),
        CrossAttentionBlock(dim, 4, ratio),
        CaptionDecoderBlock(dim, 4, ratio),
        fusion.blocks[0],
    ]
    assert [b.mlp.fc1.out_features for b in blocks] == [128] * 4
