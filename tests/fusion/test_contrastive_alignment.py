import math

import pytest
import torch
from torch import nn

from polymodal.fusion import ContrastiveAlignment, clip_loss, siglip_loss


def _alignment(**kwargs):
    torch.manual_seed(0)
    return ContrastiveAlignment({"text": 8, "image": 6, "audio": None}, embed_dim=8, **kwargs)


def _features(batch=4):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch, 6, generator=g),
        "text": torch.randn(batch, 8, generator=g),
        "audio": torch.randn(batch, 8, generator=g),
    }


def test_projections():
    align = _alignment()
    assert align.modalities == ("audio", "image", "text")
    assert isinstance(align.proj["audio"], nn.Identity)
    assert isinstance(align.proj["text"], nn.Identity)
    assert isinstance(align.proj["image"], nn.Linear) and align.proj["image"].bias is None
    assert align.proj["image"].weight.shape == (8, 6)


def test_forward_projects_and_normalises_in_sorted_order():
    align = _alignment()
    feats = _features()
    out = align({m: feats[m] for m in ("text", "image", "audio")})
    assert list(out) == ["audio", "image", "text"]
    for x in out.values():
        assert x.shape == (4, 8)
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(4))
    raw = align(feats, normalize=False)
    torch.testing.assert_close(raw["image"], feats["image"] @ align.proj["image"].weight.T)
    torch.testing.assert_close(raw["text"], feats["text"])
    torch.testing.assert_close(out["image"], raw["image"] / raw["image"].norm(dim=-1, keepdim=True))
    # a subset of modalities may be encoded on its own (e.g. only images at inference)
    torch.testing.assert_close(align({"image": feats["image"]})["image"], out["image"])


def test_logit_scale_and_clamp():
    align = _alignment()
    assert isinstance(align.logit_scale, nn.Parameter) and align.logit_scale.shape == ()
    assert align.logit_bias is None
    assert align.scale().item() == pytest.approx(1 / 0.07)
    assert align.temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        align.logit_scale.fill_(10.0)
    assert align.scale().item() == pytest.approx(100.0)  # clamped in the forward computation already
    align.clamp_()
    assert align.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        align.logit_scale.fill_(-1.0)
    align.clamp_()
    assert align.logit_scale.item() == 0.0 and align.scale().item() == 1.0


def test_siglip_init_and_frozen_scale():
    align = _alignment(init_logit_scale=math.log(10), init_logit_bias=-10.0, learn_logit_scale=False)
    assert isinstance(align.logit_bias, nn.Parameter) and align.logit_bias.item() == -10.0
    assert not align.logit_scale.requires_grad
    assert align.scale().item() == pytest.approx(10.0)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_every_parameter_gets_a_gradient(loss):
    torch.manual_seed(0)
    align = ContrastiveAlignment({"image": 6, "text": 5}, embed_dim=4, init_logit_bias=-1.0)
    encoders = nn.ModuleDict({"image": nn.Linear(3, 6), "text": nn.Linear(3, 5)})
    x = torch.randn(4, 3)
    feats = align({m: enc(x) for m, enc in encoders.items()})
    if loss == "clip":
        align.logit_bias.requires_grad_(False)  # the softmax loss has no bias
        out = clip_loss(feats, align.scale())
    else:
        out = siglip_loss(feats, align.scale(), align.logit_bias)
    out.loss.backward()
    for name, p in [*encoders.named_parameters(), *align.named_parameters()]:
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors():
    align = _alignment()
    feats = _features()
    with pytest.raises(ValueError, match=r"no projection for 'video'"):
        align({"video": torch.randn(4, 8)})
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 6\) for 'image', got shape \(4, 5\)"):
        align({"image": torch.randn(4, 5)})
    with pytest.raises(ValueError, match=r"passes 'audio' through unchanged.*width 8"):
        align({**feats, "audio": torch.randn(4, 3)})
    with pytest.raises(ValueError, match="dict of features"):
        align(feats["image"])
