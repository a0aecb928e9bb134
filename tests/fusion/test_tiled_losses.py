"""Tiled softmax and sigmoid losses equal naive ones written out here, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.fusion import clip_loss, losses, siglip_loss
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


# ---- clip_loss / siglip_loss: the tiled path is the naive path, with several positives and hard negatives ----


def _reference_clip(features, scale, groups, negatives):
    """Brute force: for each ordered pair of modalities, each row's SupCon term over the other side's columns."""
    mods = sorted(features)
    parts = {}
    for ai, a in enumerate(mods):
        for b in mods[ai + 1 :]:
            terms = []
            for rows, cols, neg in (
                (features[a], features[b], negatives.get(b)),
                (features[b], features[a], negatives.get(a)),
            ):
                cols_all = cols if neg is None else torch.cat([cols, neg])
                per_row = []
                for i in range(len(rows)):
                    s = scale * cols_all @ rows[i]
                    pos = [j for j in range(len(cols)) if groups[j] == groups[i]]
                    per_row.append(torch.logsumexp(s, 0) - s[pos].mean())
                terms.append(torch.stack(per_row).mean())
            parts[f"{a}-{b}"] = (terms[0] + terms[1]) / 2
    return torch.stack(list(parts.values())).mean(), parts


def _reference_siglip(features, scale, bias, groups, negatives):
    mods = sorted(features)
    B = len(groups)
    parts = {}
    for ai, a in enumerate(mods):
        for b in mods[ai + 1 :]:
            rows = features[a] if a not in negatives else torch.cat([features[a], negatives[a]])
            cols = features[b] if b not in negatives else torch.cat([features[b], negatives[b]])
            total = 0.0
            for i in range(len(rows)):
                for j in range(len(cols)):
                    z = 1.0 if i < B and j < B and groups[i] == groups[j] else -1.0
                    total = total - F.logsigmoid(z * (scale * rows[i] @ cols[j] + bias))
            parts[f"{a}-{b}"] = total / B
    return torch.stack(list(parts.values())).mean(), parts


def _batch(B=9, K=4, D=8, mods=("audio", "image", "text"), neg_mods=("text",), seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = {m: F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_() for m in mods}
    negs = {
        m: F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1).requires_grad_() for m in neg_mods
    }
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5][:B])
    return feats, negs, groups


def _leaves(feats, negs, *scalars):
    return [*feats.values(), *negs.values(), *scalars]


@pytest.mark.parametrize("tile", [None, 2, 4, 1000])
@pytest.mark.parametrize("neg_mods", [(), ("text",), ("image", "text")])
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_with_groups_and_negatives_equals_brute_force(tile, neg_mods, local_loss):
    feats, negs, groups = _batch(neg_mods=neg_mods)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    out = clip_loss(feats, scale, groups=groups, negatives=negs, tile=tile, local_loss=local_loss)
    want, want_parts = _reference_clip(feats, scale, groups, negs)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    for key, part in want_parts.items():
        torch.testing.assert_close(out.parts[key], part, rtol=1e-10, atol=1e-12)
    leaves = _leaves(feats, negs, scale)
    for a, b in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tile", [None, 3, 1000])
@pytest.mark.parametrize("neg_mods", [(), ("text",), ("image", "text")])
def test_siglip_loss_with_groups_and_negatives_equals_brute_force(tile, neg_mods):
    feats, negs, groups = _batch(mods=("image", "text"), neg_mods=neg_mods)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    out = siglip_loss(feats, scale, bias, groups=groups, negatives=negs, tile=tile)
    want, _ = _reference_siglip(feats, scale, bias, groups, negs)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    leaves = _leaves(feats, negs, scale, bias)
    for a, b in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_default_groups_are_clip_and_the_tiled_path_is_the_old_dense_one():
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(37, 16, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(37, 16, generator=g), dim=-1).requires_grad_()
    logits = 10.0 * a @ b.T
    labels = torch.arange(37)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    for tile in (None, 5, "auto"):
        got = clip_loss({"image": a, "text": b}, 10.0, tile=tile).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for x, y in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(want, (a, b), retain_graph=True)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_auto_tiles_only_large_matrices(monkeypatch):
    calls = []
    real = losses.tiled_infonce
    monkeypatch.setattr(losses, "tiled_infonce", lambda *a, **k: calls.append(k["tile"]) or real(*a, **k))
    feats, _, _ = _batch(mods=("image", "text"), neg_mods=())
    clip_loss(feats, 5.0)
    assert calls == []  # 9 x 9 logits: the dense path
    monkeypatch.setattr(losses, "AUTO_TILE_LOGITS", 80)
    clip_loss(feats, 5.0)
    assert calls == [losses.DEFAULT_TILE]


def test_bf16_features_tiled_match_float32_within_their_rounding():
    """Stated tolerance under bf16: the tiled loss on bf16 features equals the float32 loss on the same
    (rounded) values within 1e-5, and its gradients within bf16's own rounding (relative 1e-2)."""
    g = torch.Generator().manual_seed(7)
    a32 = F.normalize(torch.randn(300, 64, generator=g), dim=-1).bfloat16().float().requires_grad_()
    b32 = F.normalize(torch.randn(300, 64, generator=g), dim=-1).bfloat16().float().requires_grad_()
    a16, b16 = a32.detach().bfloat16().requires_grad_(), b32.detach().bfloat16().requires_grad_()
    groups = torch.arange(300) // 2
    want = clip_loss({"image": a32, "text": b32}, 50.0, groups=groups, tile=None).loss
    got = clip_loss({"image": a16, "text": b16}, 50.0, groups=groups, tile=64).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for x, y in zip(torch.autograd.grad(got, (a16, b16)), torch.autograd.grad(want, (a32, b32))):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x.float(), y, rtol=1e-2, atol=1e-2 * y.abs().max().item())


def test_bad_groups_negatives_and_tiles_name_what_was_wrong():
    feats, negs, groups = _batch(mods=("image", "text"))
    for kwargs, message in [
        ({"tile": 0}, "tile must be 'auto', None or a positive integer"),
        ({"tile": "big"}, "tile must be 'auto', None or a positive integer"),
        ({"groups": groups[:4]}, r"groups must be a \(9,\) integer tensor"),
        ({"groups": groups.float()}, r"groups must be a \(9,\) integer tensor"),
        ({"groups": groups - 1}, "group ids must be >= 0"),
        ({"negatives": {"audio": negs["text"]}}, "negatives for 'audio', a modality without features"),
        ({"negatives": {"text": negs["text"][:, :3]}}, r"negatives\['text'\] must be \(K, 8\) features"),
    ]:
        for loss in (clip_loss, lambda f, s, **k: siglip_loss(f, s, -1.0, **k)):
            with pytest.raises(ValueError, match=message):
                loss(feats, 5.0, **kwargs)
