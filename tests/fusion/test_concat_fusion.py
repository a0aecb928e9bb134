import pytest
import torch
from torch import nn

from polymodal.fusion import ConcatFusion

DIMS = {"text": 3, "audio": 2, "image": 4}


def _features(batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g) for m, d in DIMS.items()}


def test_concatenates_in_sorted_order_without_projection():
    fusion = ConcatFusion(DIMS)
    feats = _features()
    out = fusion(feats)
    assert fusion.output_dim == 9
    assert fusion.modalities == ("audio", "image", "text")
    torch.testing.assert_close(out, torch.cat([feats["audio"], feats["image"], feats["text"]], dim=-1))


def test_projection_shapes_and_layers():
    fusion = ConcatFusion(DIMS, output_dim=8, norm_layer="layernorm", act_layer="gelu", dropout=0.1)
    assert fusion.output_dim == 8
    assert [type(m) for m in fusion.proj] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout]
    fusion.eval()
    out = fusion(_features())
    assert out.shape == (5, 8)
    # LayerNorm then GELU: each row is normalised before the activation
    pre_act = fusion.proj[1](fusion.proj[0](torch.cat([_features()[m] for m in sorted(DIMS)], -1)))
    torch.testing.assert_close(out, nn.functional.gelu(pre_act))


def test_insertion_order_does_not_matter():
    torch.manual_seed(0)
    fusion = ConcatFusion(DIMS, output_dim=6)
    feats = _features()
    reordered = {m: feats[m] for m in ("image", "text", "audio")}
    torch.testing.assert_close(fusion(feats), fusion(reordered), rtol=0, atol=0)


def test_every_parameter_gets_a_gradient_through_stub_encoders():
    torch.manual_seed(0)
    encoders = nn.ModuleDict({m: nn.Linear(6, d) for m, d in DIMS.items()})
    fusion = ConcatFusion(DIMS, output_dim=4, norm_layer="layernorm", act_layer="relu")
    x = torch.randn(5, 6)
    fusion({m: enc(x) for m, enc in encoders.items()}).square().sum().backward()
    for name, p in [*encoders.named_parameters(), *fusion.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors_name_the_modalities():
    fusion = ConcatFusion(DIMS, output_dim=4)
    feats = _features()
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        fusion({m: feats[m] for m in ("audio", "image")})
    with pytest.raises(ValueError, match=r"unexpected \['video'\]"):
        fusion({**feats, "video": torch.randn(5, 2)})
    with pytest.raises(ValueError, match=r"same batch size.*'audio': 5, 'image': 3, 'text': 5"):
        fusion({**feats, "image": torch.randn(3, 4)})
    with pytest.raises(ValueError, match=r"shape \(B, 4\) for 'image', got shape \(5, 7\)"):
        fusion({**feats, "image": torch.randn(5, 7)})
    with pytest.raises(ValueError, match="floating-point"):
        fusion({**feats, "image": torch.ones(5, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="set output_dim"):
        ConcatFusion(DIMS, act_layer="gelu")
    with pytest.raises(ValueError, match="at least one modality"):
        ConcatFusion({})
