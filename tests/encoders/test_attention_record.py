"""``record_attention``: the attention probabilities on request, with the output unchanged and nothing kept
outside the block."""

import pytest
import torch

from polymodal.encoders import TextTransformer, VisionTransformer, attention_weights, record_attention


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, output_dim=8).eval()


def test_recorded_weights_are_distributions_and_the_output_is_unchanged():
    vit, x = tiny_vit(), torch.randn(2, 3, 16, 16)
    plain = vit(x)
    with record_attention(vit) as records:
        recorded = vit(x)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=1e-6)
    assert list(records) == ["transformer.blocks.0.attn", "transformer.blocks.1.attn"]
    for weights in records.values():
        assert len(weights) == 1 and weights[0].shape == (2, 2, 17, 17)  # (B, heads, 1 + 16 patches, same)
        torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 2, 17))
        assert (weights[0] >= 0).all()


def test_nothing_is_recorded_after_the_block_and_sdpa_is_back():
    vit, x = tiny_vit(), torch.randn(1, 3, 16, 16)
    with record_attention(vit, names=["transformer.blocks.1.attn"]) as records:
        vit(x)
    vit(x)
    assert list(records) == ["transformer.blocks.1.attn"] and len(records["transformer.blocks.1.attn"]) == 1
    with record_attention(vit) as again:  # every attention was released
        vit(x)
    assert all(len(w) == 1 for w in again.values())


def test_causal_and_padding_masks_are_those_sdpa_applies():
    torch.manual_seed(0)
    causal = TextTransformer(vocab_size=50, context_length=6, width=32, layers=1, heads=2, output_dim=8).eval()
    padded = TextTransformer(
        vocab_size=50, context_length=6, width=32, layers=1, heads=2, output_dim=8, causal=False, pad_token_id=0
    ).eval()
    text = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 0]])
    for tower in (causal, padded):
        plain = tower.forward_features(text)
        with record_attention(tower) as records:
            recorded = tower.forward_features(text)
        torch.testing.assert_close(recorded, plain, rtol=0, atol=1e-6)
        (weights,) = records["transformer.blocks.0.attn"]  # (B, heads, L, L)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 6))
        if tower is causal:
            seen = torch.ones(6, 6, dtype=torch.bool).tril()  # query i sees keys 0 .. i
            assert (weights[..., ~seen] == 0).all() and (weights[..., seen] > 0).all()
        else:  # no query attends to padding
            assert (weights[0, :, :, 3:] == 0).all() and (weights[1, :, :, 5] == 0).all()
            assert (weights[0, :, :, :3] > 0).all()


def test_weights_match_a_float_mask_and_a_query_with_nothing_to_see_gets_none():
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)
    boolean = torch.tensor([[True, True, False, False, False], [False] * 5, [True] * 5])
    additive = torch.zeros(3, 5).masked_fill(~boolean, float("-inf"))
    weights = attention_weights(q, k, boolean)
    torch.testing.assert_close(weights[0, 0, [0, 2]], attention_weights(q, k, additive)[0, 0, [0, 2]])
    assert (weights[0, 0, 1] == 0).all()  # SDPA gives that query a zero output
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)[0, 0, 2]
    torch.testing.assert_close(weights[0, 0, 2], expected)


def test_misuse_is_named():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="holds no Attention"), record_attention(torch.nn.Linear(2, 2)):
        pass
    with pytest.raises(ValueError, match="no Attention named"), record_attention(vit, names=["blocks.9.attn"]):
        pass
    with record_attention(vit), pytest.raises(ValueError, match="already being recorded"), record_attention(vit):
        pass
