"""Tiled softmax and sigmoid losses equal naive ones written out here, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.fusion.tiled import tiled_infonce, tiled_sigmoid


def naive_multi_positive(q, k, scale, qg, kg):
    """Row and column SupCon-style terms over the full logit matrix, one row / column at a time."""
    s = scale * q @ k.T
    pos = qg[:, None] == kg[None, :]
    rows = torch.stack([torch.logsumexp(s[i], 0) - s[i][pos[i]].mean() for i in range(len(q))]).mean()
    valid = [j for j in range(len(k)) if kg[j] >= 0]
    cols = torch.stack([torch.logsumexp(s[:, j], 0) - s[:, j][pos[:, j]].mean() for j in valid]).mean()
    return rows, cols


def _features(R, C, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(R, D, generator=g), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(C, D, generator=g), dim=-1).to(dtype).requires_grad_()
    return q, k


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("tile", [1, 3, 5, 64])
def test_clip_diagonal_equals_cross_entropy_both_directions(tile):
    q, k = _features(13, 13)  # odd batch, tiles that do not divide it
    scale = torch.tensor(7.5, requires_grad=True)
    groups = torch.arange(13)
    rows, cols = tiled_infonce(q, k, scale, groups, groups, tile=tile, columns=True)
    logits = scale * q @ k.T
    want_rows, want_cols = F.cross_entropy(logits, groups), F.cross_entropy(logits.T, groups)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cols, want_cols, rtol=1e-5, atol=1e-6)
    got = _grads(rows + 0.3 * cols, q, k, scale)
    want = _grads(want_rows + 0.3 * want_cols, q, k, scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [2, 7])
def test_multi_positive_with_hard_negative_columns_equals_naive(tile):
    q, k = _features(11, 15, seed=1)
    qg = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    kg = torch.cat([qg, torch.full((4,), -1)])  # 4 extra columns that are only negatives
    scale = torch.tensor(5.0, requires_grad=True)
    rows, cols = tiled_infonce(q, k, scale, qg, kg, tile=tile, columns=True)
    want_rows, want_cols = naive_multi_positive(q, k, scale, qg, kg)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cols, want_cols, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(rows + cols, q, k, scale), _grads(want_rows + want_cols, q, k, scale)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rows_only_and_a_missing_positive_is_refused():
    q, k = _features(5, 9, seed=2)
    qg, kg = torch.arange(5) + 2, torch.arange(9)  # rows offset into the columns, as a rank's are
    rows, cols = tiled_infonce(q, k, 3.0, qg, kg, tile=4)
    torch.testing.assert_close(rows, F.cross_entropy(3.0 * q @ k.T, qg), rtol=1e-5, atol=1e-6)
    assert cols.item() == 0.0
    with pytest.raises(ValueError, match="row 0 has no positive"):
        tiled_infonce(q, k, 3.0, torch.tensor([99, 2, 3, 4, 5]), kg)
    with pytest.raises(ValueError, match="tile size must be a positive integer"):
        tiled_infonce(q, k, 3.0, qg, kg, tile=0)


@pytest.mark.parametrize("tile", [1, 4, 100])
def test_sigmoid_equals_naive_with_groups(tile):
    q, k = _features(9, 12, seed=3)
    qg = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5, 6])
    kg = torch.cat([qg, torch.full((3,), -1)])
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    got = tiled_sigmoid(q, k, scale, bias, qg, kg, tile=tile)
    signs = (qg[:, None] == kg[None, :]).float() * 2 - 1
    want = -F.logsigmoid(signs * (scale * q @ k.T + bias)).sum() / len(q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(got, q, k, scale, bias), _grads(want, q, k, scale, bias)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_features_stay_close_to_fp32():
    q32, k32 = _features(40, 40, D=32, seed=4)
    q16, k16 = (t.detach().bfloat16().requires_grad_() for t in (q32, k32))
    groups = torch.arange(40)
    rows16, _ = tiled_infonce(q16, k16, 20.0, groups, groups, tile=16)
    rows32, _ = tiled_infonce(q32, k32, 20.0, groups, groups, tile=16)
    # bf16 inputs keep 8 bits of mantissa; logits of scale 20 then differ by about 20 * 2**-8
    torch.testing.assert_close(rows16, rows32, rtol=0, atol=0.1)
    g16, g32 = _grads(rows16, q16)[0], _grads(rows32, q32)[0]
    assert g16.dtype == torch.bfloat16
    assert F.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0) > 0.99
