"""clip_loss and siglip_loss against naive loop implementations, in a single process."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.fusion import ClipLoss, ContrastiveLossOutput, SigLipLoss, clip_loss, siglip_loss


def _features(modalities, batch=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        for m in modalities
    }


def naive_clip(features, scale):
    """Symmetric InfoNCE over all pairs, one logit and one log-sum-exp at a time."""
    parts = {}
    for a, b in itertools.combinations(sorted(features), 2):
        x, y = features[a], features[b]
        n = x.shape[0]
        logits = [[scale * torch.dot(x[i], y[j]) for j in range(n)] for i in range(n)]
        rows = sum(-logits[i][i] + torch.logsumexp(torch.stack(logits[i]), 0) for i in range(n)) / n
        cols = (
            sum(-logits[j][j] + torch.logsumexp(torch.stack([logits[i][j] for i in range(n)]), 0) for j in range(n)) / n
        )
        parts[f"{a}-{b}"] = (rows + cols) / 2
    return sum(parts.values()) / len(parts), parts


def naive_siglip(features, scale, bias):
    """-1/n * sum_ij log sigmoid(z_ij * (scale * x_i.y_j + bias)) over all pairs, term by term."""
    parts = {}
    for a, b in itertools.combinations(sorted(features), 2):
        x, y = features[a], features[b]
        n = x.shape[0]
        total = 0.0
        for i in range(n):
            for j in range(n):
                z = 1.0 if i == j else -1.0
                logit = scale * torch.dot(x[i], y[j]) + bias
                total = total - torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
        parts[f"{a}-{b}"] = total / n
    return sum(parts.values()) / len(parts), parts


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("modalities", [("image", "text"), ("audio", "image", "text")])
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_naive(modalities, local_loss):
    feats = _features(modalities)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    out = clip_loss(feats, scale, local_loss=local_loss)
    ref, ref_parts = naive_clip(feats, scale)

    assert isinstance(out, ContrastiveLossOutput)
    assert out.loss.shape == ()
    assert list(out.parts) == [f"{a}-{b}" for a, b in itertools.combinations(sorted(modalities), 2)]
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for key in ref_parts:
        torch.testing.assert_close(out.parts[key], ref_parts[key], rtol=1e-10, atol=1e-10)
    inputs = [*feats.values(), scale]
    for got, want in zip(_grads(out.loss, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("modalities", [("image", "text"), ("audio", "image", "text")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_siglip_loss_matches_naive(modalities, with_bias):
    feats = _features(modalities, seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0 if with_bias else 0.0, dtype=torch.float64, requires_grad=True)
    out = siglip_loss(feats, scale, bias if with_bias else None)
    ref, ref_parts = naive_siglip(feats, scale, bias)

    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for key in ref_parts:
        torch.testing.assert_close(out.parts[key], ref_parts[key], rtol=1e-10, atol=1e-10)
    inputs = [*feats.values(), scale] + ([bias] if with_bias else [])
    for got, want in zip(_grads(out.loss, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_clip_loss_at_zero_scale_is_log_batch():
    # with all logits equal every class is equally likely
    out = clip_loss(_features(("image", "text"), batch=7), 0.0)
    assert out.loss.item() == pytest.approx(math.log(7), abs=1e-12)


def test_losses_ignore_dict_order():
    feats = _features(("audio", "image", "text"))
    reordered = {m: feats[m] for m in ("text", "audio", "image")}
    assert list(clip_loss(reordered, 5.0).parts) == ["audio-image", "audio-text", "image-text"]
    torch.testing.assert_close(clip_loss(reordered, 5.0).loss, clip_loss(feats, 5.0).loss, rtol=0, atol=0)
    torch.testing.assert_close(siglip_loss(reordered, 5.0, -2.0).loss, siglip_loss(feats, 5.0, -2.0).loss)


def test_modules_wrap_functions():
    feats = _features(("image", "text"))
    torch.testing.assert_close(ClipLoss(local_loss=True)(feats, 3.0).loss, clip_loss(feats, 3.0).loss)
    torch.testing.assert_close(SigLipLoss()(feats, 3.0, -1.0).loss, siglip_loss(feats, 3.0, -1.0).loss)


@pytest.mark.parametrize("loss_fn", [clip_loss, siglip_loss])
def test_loss_errors(loss_fn):
    name = loss_fn.__name__
    with pytest.raises(ValueError, match=rf"{name} needs features of at least 2 modalities, got \['image'\]"):
        loss_fn({"image": torch.randn(3, 4)}, 1.0)
    with pytest.raises(ValueError, match=r"same batch size.*'image': 3, 'text': 4"):
        loss_fn({"image": torch.randn(3, 4), "text": torch.randn(4, 4)}, 1.0)
    with pytest.raises(ValueError, match=r"same embedding width.*'image': 4, 'text': 5"):
        loss_fn({"image": torch.randn(3, 4), "text": torch.randn(3, 5)}, 1.0)
    with pytest.raises(ValueError, match=r"shape \(B, D\) for 'text', got shape \(3, 2, 4\)"):
        loss_fn({"image": torch.randn(3, 4), "text": torch.randn(3, 2, 4)}, 1.0)
    with pytest.raises(ValueError, match="dict of"):
        loss_fn([torch.randn(3, 4), torch.randn(3, 4)], 1.0)
    with pytest.raises(ValueError, match="scalar logit_scale"):
        loss_fn({"image": torch.randn(3, 4), "text": torch.randn(3, 4)}, torch.ones(2))
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        loss_fn({"image": torch.randn(3, 4), "text": torch.randn(3, 4)}, 1.0, gather=True)
