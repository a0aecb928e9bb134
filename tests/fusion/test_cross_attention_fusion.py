import pytest
import torch
from torch import nn

from polymodal.fusion import CrossAttentionFusion, FusionOutput
from tests.helpers import assert_checkpointing_matches

DIMS = {"image": 24, "text": 32}  # image is projected to dim=32, text passes through


def _fusion(bidirectional=False, output_dim=None, seed=0):
    torch.manual_seed(seed)
    return CrossAttentionFusion(
        "text",
        "image",
        dim=32,
        heads=4,
        layers=2,
        input_dims=DIMS,
        bidirectional=bidirectional,
        output_dim=output_dim,
    ).eval()


def _features(batch=3, n_text=5, n_image=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch, n_image, 24, generator=g),
        "text": torch.randn(batch, n_text, 32, generator=g),
    }


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("output_dim", [None, 16])
def test_shapes(bidirectional, output_dim):
    fusion = _fusion(bidirectional, output_dim)
    out = fusion(_features())
    assert isinstance(out, FusionOutput)
    pooled_dim = output_dim or (64 if bidirectional else 32)
    assert fusion.output_dim == pooled_dim
    assert out.pooled.shape == (3, pooled_dim)
    assert out.tokens.shape == (3, 5 + (7 if bidirectional else 0), 32)
    assert isinstance(fusion.input_proj["image"], nn.Linear)
    assert isinstance(fusion.input_proj["text"], nn.Identity)


def test_pooled_vectors_are_one_token_sequences():
    fusion = _fusion(bidirectional=True)
    feats = _features()
    pooled = {"image": feats["image"][:, 0], "text": feats["text"][:, 0]}
    out = fusion(pooled)
    assert out.tokens.shape == (3, 2, 32)
    torch.testing.assert_close(out.pooled, fusion({m: x[:, None] for m, x in pooled.items()}).pooled)


def test_pooled_is_the_mean_of_query_tokens():
    fusion = _fusion()
    out = fusion(_features())
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))


def test_insertion_order_does_not_matter():
    fusion = _fusion(bidirectional=True)
    feats = _features()
    torch.testing.assert_close(fusion(feats).pooled, fusion({"text": feats["text"], "image": feats["image"]}).pooled)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_tokens_do_not_change_the_output(bidirectional):
    fusion = _fusion(bidirectional)
    feats = _features(n_text=4, n_image=5)
    ref = fusion(feats)
    # append 3 padded image tokens and 2 padded text tokens with arbitrary content
    padded = {
        "image": torch.cat([feats["image"], 100 * torch.randn(3, 3, 24)], dim=1),
        "text": torch.cat([feats["text"], 100 * torch.randn(3, 2, 32)], dim=1),
    }
    masks = {"image": torch.arange(8).expand(3, 8) < 5, "text": torch.arange(6).expand(3, 6) < 4}
    out = fusion(padded, masks=masks)
    torch.testing.assert_close(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tokens[:, :4], ref.tokens[:, :4], rtol=1e-5, atol=1e-5)
    if bidirectional:
        torch.testing.assert_close(out.tokens[:, 6:11], ref.tokens[:, 4:], rtol=1e-5, atol=1e-5)
    # without the masks the padding does change the result
    assert not torch.allclose(fusion(padded).pooled, ref.pooled, atol=1e-3)


def test_per_sample_masks():
    fusion = _fusion()
    feats = _features(batch=2)
    masks = {"image": torch.tensor([[True] * 7, [True] * 3 + [False] * 4])}
    out = fusion(feats, masks=masks)
    alone = fusion({"image": feats["image"][1:, :3], "text": feats["text"][1:]})
    torch.testing.assert_close(out.pooled[1:], alone.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled[:1], fusion({m: x[:1] for m, x in feats.items()}).pooled)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_every_parameter_gets_a_gradient_through_stub_encoders(bidirectional):
    fusion = _fusion(bidirectional, output_dim=8).train()
    encoders = nn.ModuleDict({"image": nn.Linear(6, 24), "text": nn.Linear(6, 32)})
    x = torch.randn(3, 4, 6)
    fusion({m: enc(x) for m, enc in encoders.items()}).pooled.square().sum().backward()
    for name, p in [*encoders.named_parameters(), *fusion.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradient_checkpointing_gives_the_same_output_and_gradients(bidirectional):
    fusion = _fusion(bidirectional)
    feats = _features()
    assert_checkpointing_matches(fusion, lambda: fusion(feats).tokens)


def test_errors():
    fusion = _fusion()
    feats = _features()
    with pytest.raises(ValueError, match=r"missing \['image'\]"):
        fusion({"text": feats["text"]})
    with pytest.raises(ValueError, match=r"unexpected \['audio'\]"):
        fusion({**feats, "audio": feats["text"]})
    with pytest.raises(ValueError, match=r"\(B, N, 24\) or \(B, 24\) for 'image', got shape \(3, 7, 32\)"):
        fusion({**feats, "image": torch.randn(3, 7, 32)})
    with pytest.raises(ValueError, match=r"same batch size.*'image': 2, 'text': 3"):
        fusion({**feats, "image": feats["image"][:2]})
    with pytest.raises(ValueError, match=r"bool mask of shape \(3, 7\).*'image'"):
        fusion(feats, masks={"image": torch.ones(3, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"bool mask"):
        fusion(feats, masks={"image": torch.ones(3, 7)})
    with pytest.raises(ValueError, match=r"subset of \['image', 'text'\]"):
        fusion(feats, masks={"audio": torch.ones(3, 7, dtype=torch.bool)})
    empty = torch.ones(3, 7, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"at least one kept token.*'image'"):
        fusion(feats, masks={"image": empty})
    with pytest.raises(ValueError, match="two different modalities"):
        CrossAttentionFusion("text", "text", 32, 4, 1, input_dims={"text": 32})
    with pytest.raises(ValueError, match=r"input_dims.*missing \['image'\]"):
        CrossAttentionFusion("text", "image", 32, 4, 1, input_dims={"text": 32})
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionFusion("text", "image", 30, 4, 1, input_dims=DIMS)
