import pytest
import torch
from torch import nn

from polymodal.fusion import AttentionFusion

DIMS = {"text": 3, "audio": 2, "image": 4}


def _features(batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in DIMS.items()}


def test_weighted_sum_of_projections():
    torch.manual_seed(0)
    fusion = AttentionFusion(DIMS, dim=8, hidden_dim=6)
    feats = _features()
    fused, weights = fusion.forward_with_weights(feats)
    assert fused.shape == (5, 8) and weights.shape == (5, 3)
    assert fusion.output_dim == 8
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(fusion.last_weights, weights.detach())
    assert not fusion.last_weights.requires_grad

    # by hand: score each projection with the shared MLP, softmax over the sorted modalities
    projected = [fusion.proj[m](feats[m]) for m in ("audio", "image", "text")]
    scores = torch.cat([fusion.score(p) for p in projected], dim=-1)  # (B, 3)
    expected_weights = scores.softmax(-1)
    expected = sum(expected_weights[:, i : i + 1] * p for i, p in enumerate(projected))
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fusion(feats), fused)
    # weights are per sample, not one global mixture
    assert not torch.allclose(weights[0], weights[1])


def test_insertion_order_does_not_matter():
    torch.manual_seed(0)
    fusion = AttentionFusion(DIMS, dim=8)
    feats = _features()
    reordered = {m: feats[m] for m in ("image", "text", "audio")}
    torch.testing.assert_close(fusion(feats), fusion(reordered), rtol=0, atol=0)


def test_every_parameter_gets_a_gradient_through_stub_encoders():
    torch.manual_seed(0)
    encoders = nn.ModuleDict({m: nn.Linear(6, d) for m, d in DIMS.items()})
    fusion = AttentionFusion(DIMS, dim=8)
    x = torch.randn(5, 6)
    fusion({m: enc(x) for m, enc in encoders.items()}).square().sum().backward()
    for name, p in [*encoders.named_parameters(), *fusion.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors():
    fusion = AttentionFusion(DIMS, dim=8)
    feats = _features()
    with pytest.raises(ValueError, match=r"missing \['audio'\]"):
        fusion({m: feats[m] for m in ("image", "text")})
    with pytest.raises(ValueError, match=r"same batch size"):
        fusion({**feats, "text": torch.randn(2, 3)})
    with pytest.raises(ValueError, match=r"shape \(B, 3\) for 'text', got shape \(5, 2, 3\)"):
        fusion({**feats, "text": torch.randn(5, 2, 3)})
