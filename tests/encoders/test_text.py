import pytest
import torch

from polymodal.encoders import TextTransformer
from tests.helpers import assert_all_params_get_grad, assert_checkpointing_matches


def tiny_text(**kw):
    args = dict(vocab_size=100, context_length=16, width=32, layers=2, heads=2, output_dim=24)
    return TextTransformer(**{**args, **kw})


def ids(batch=3, length=16, eot=99):
    """Token ids ending with an end-of-text token (the highest id, as in CLIP) and zero padding."""
    x = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = 3 + 2 * i
        x[i, :n] = torch.randint(1, 90, (n,))
        x[i, n] = eot
    return x


def test_shapes_and_interface():
    m = tiny_text()
    t = ids()
    assert m(t).shape == (3, 24)
    assert m.forward_features(t).shape == (3, 16, 32)
    assert (m.output_dim, m.width, m.modality) == (24, 32, "text")


def test_every_parameter_gets_gradient():
    m = tiny_text()
    assert_all_params_get_grad(m, m(ids()).square().sum())


def test_grad_checkpointing_same_output():
    m = tiny_text()
    t = ids()
    assert_checkpointing_matches(m, lambda: m(t))


def test_causal_pooling_ignores_padding_and_later_tokens():
    m = tiny_text().eval()
    t = ids()
    noisy = t.clone()
    noisy[noisy == 0] = 7  # tokens after end-of-text cannot affect it under the causal mask
    torch.testing.assert_close(m(t), m(noisy))
    # a shorter context (padding trimmed) gives the same embedding
    torch.testing.assert_close(m(t[:, :12]), m(t))


def test_causal_mask_is_causal():
    m = tiny_text().eval()
    t = ids()
    changed = t.clone()
    changed[:, -1] = 5
    a, b = m.forward_features(t), m.forward_features(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("pool_type", ["eos", "first", "last", "mean"])
def test_pool_types(pool_type):
    m = tiny_text(pool_type=pool_type, eos_token_id=99).eval()
    t = ids()
    tokens = m.forward_features(t)
    i = torch.arange(3)
    expected = {
        "eos": tokens[i, (t == 99).int().argmax(-1)],
        "first": tokens[:, 0],
        "last": tokens[i, (t != 0).sum(-1) - 1],
        "mean": torch.stack([tokens[b, t[b] != 0].mean(0) for b in range(3)]),
    }[pool_type]
    torch.testing.assert_close(m(t), m.proj(expected))


@pytest.mark.parametrize("pool_type", ["argmax", "eos", "first", "last", "mean"])
def test_causal_tower_runs_only_the_positions_pooling_reads(pool_type):
    """Padding after the last position pooling reads is cut off before the blocks: same output and
    gradients as running the whole context, for less work."""
    m = tiny_text(pool_type=pool_type, eos_token_id=99)
    t = ids()  # the longest row ends at position 7 of 16
    seen = []
    m.transformer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    trimmed = m(t)
    full = m.proj(m.pool(m.forward_features(t), t))
    torch.testing.assert_close(trimmed, full)
    assert seen[0] == {"first": 1}.get(pool_type, 8) and seen[1] == 16
    grads = torch.autograd.grad(trimmed.square().sum(), list(m.parameters()))
    expected = torch.autograd.grad(full.square().sum(), list(m.parameters()))
    for g, e in zip(grads, expected):  # equal up to summation order
        assert (g - e).norm() <= 1e-5 * e.norm() + 1e-7


def test_non_causal_masks_padding():
    m = tiny_text(causal=False, pool_type="mean").eval()
    t = ids()
    longer = torch.cat([t, torch.zeros(3, 0, dtype=torch.long)], 1)
    torch.testing.assert_close(m(t[:, :12]), m(longer))


def test_unmasked_bidirectional_tower_pooled_at_the_final_position():
    """SigLIP's text tower: every position attends to every other, padding included, and the last is pooled."""
    m = tiny_text(causal=False, mask_padding=False, pool_type="final_position").eval()
    t = ids()
    tokens = m.forward_features(t)
    torch.testing.assert_close(m(t), m.proj(tokens[:, -1]))
    changed = t.clone()
    changed[:, -3] = 7  # padding, which this tower attends to
    assert (m(t) - m(changed)).abs().amax(-1).min() > 1e-4
    assert (m.forward_features(t)[:, 0] - m.forward_features(changed)[:, 0]).abs().max() > 1e-4
    assert_all_params_get_grad(m, m(t).square().sum())
    m.zero_grad(set_to_none=True)
    assert_checkpointing_matches(m, lambda: m(t))


def test_context_interpolation_accepts_longer_text():
    m = tiny_text().eval()
    with pytest.raises(ValueError, match="L <= 16"):
        m(torch.ones(2, 20, dtype=torch.long))
    table = m.pos_embed.detach().clone()
    m.set_context_length(31)
    assert m.pos_embed.shape == (31, 32) and m.context_length == 31
    # linear interpolation with align_corners keeps the original rows at even positions
    torch.testing.assert_close(m.pos_embed[::2].detach(), table)
    assert m(torch.ones(2, 20, dtype=torch.long)).shape == (2, 24)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.ones(16, dtype=torch.long), r"2-D tensor"),
        (torch.ones(2, 16), "integer tensor"),
        (torch.full((2, 16), 100), r"ids in \[0, 100\)"),
        (torch.full((2, 16), -1), r"ids in \[0, 100\)"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        tiny_text()(x)


def test_lock_with_unlocked_layers():
    m = tiny_text()
    m.lock(unlocked_layers=1)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "norm.weight",
        "norm.bias",
        "proj.weight",
    }


def test_eos_pooling_reads_the_first_eos_and_ignores_what_follows():
    """``pool_type="eos"`` (MetaCLIP-2, open_clip ``pool_type: eos``) pools the FIRST ``eos_token_id``, which
    need not be the highest id; a row without one pools its last position."""
    m = tiny_text(pool_type="eos", eos_token_id=5).eval()
    t = torch.tensor(
        [
            [1, 60, 70, 5, 0, 0, 0, 0],  # ids above the eos id: argmax would pick position 2
            [1, 5, 80, 5, 0, 0, 0, 0],  # two eos ids: the first counts
            [1, 60, 70, 80, 90, 30, 20, 10],  # none: the last position
        ]
    )
    tokens = m.forward_features(t)
    naive = []
    for b in range(t.shape[0]):
        hits = [i for i, v in enumerate(t[b].tolist()) if v == 5]
        naive.append(tokens[b, hits[0] if hits else t.shape[1] - 1])
    torch.testing.assert_close(m(t), m.proj(torch.stack(naive)))
    # padding or any tokens after the first eos cannot change the embedding (causal), nor can appended padding
    changed = t.clone()
    changed[:2, 4:] = 77
    torch.testing.assert_close(m(changed[:2]), m(t[:2]))
    torch.testing.assert_close(m(torch.cat([t[:2], torch.zeros(2, 8, dtype=torch.long)], 1)), m(t[:2]))


@pytest.mark.parametrize("pool_type", ["argmax", "eos"])
def test_exports_with_dynamic_batch_and_length(pool_type):
    """The length cut-off reads the data, so a traced program runs the whole input instead: the same
    embedding for ids shorter than the context and batches of another size."""
    from torch.export import Dim

    m = tiny_text(pool_type=pool_type, eos_token_id=99).eval()
    dims = ({0: Dim("batch", min=1, max=64), 1: Dim("length", min=2, max=16)},)
    program = torch.export.export(m, (ids(3, 16),), dynamic_shapes=dims, strict=False).module()
    with torch.no_grad():
        for x in (ids(3, 16), ids(2, 9), ids(5, 12), ids(1, 4)[:, :2]):
            torch.testing.assert_close(program(x), m(x), rtol=1e-5, atol=1e-6)


def test_class_token_is_appended_pooled_and_masked_as_open_clips_coca():
    m = tiny_text(class_token=True, pool_type="final_position").eval()
    t = ids()
    hidden = m.forward_hidden(t)
    assert hidden.shape == (3, 17, 32) and m.pos_embed.shape == (17, 32)
    torch.testing.assert_close(m.forward_features(t), m.norm(hidden))
    torch.testing.assert_close(m(t), m.proj(m.norm(hidden[:, -1])))
    torch.testing.assert_close(m.embed_hidden(hidden, t), m(t))
    # the mask by hand: key j is seen by queries i >= j when j == 0 or token j - 1 is not padding
    L = t.shape[1] + 1
    keep = torch.cat([torch.ones(3, 1, dtype=torch.bool), t != 0], dim=1)  # (3, L)
    mask = keep[:, None, :] & torch.ones(L, L, dtype=torch.bool).tril()  # (3, L, L)
    x = torch.cat([m.token_embedding(t), m.cls_token.expand(3, 1, -1)], dim=1) + m.pos_embed
    torch.testing.assert_close(hidden, m.transformer(x, attn_mask=mask[:, None]), rtol=0, atol=1e-6)
    # text positions stay causal: a later token cannot change an earlier state
    later = t.clone()
    later[:, 10] = 55
    torch.testing.assert_close(m.forward_hidden(later)[:, :10], hidden[:, :10], rtol=0, atol=1e-6)


def test_class_token_learns_and_resizes_with_the_context():
    m = tiny_text(class_token=True, pool_type="final_position")
    assert_all_params_get_grad(m, m(ids()).square().sum())
    assert any(p is m.cls_token for p in m.layer_groups()[0])
    m.set_context_length(24)
    assert m.pos_embed.shape == (25, 32) and m(ids(2, 24)).shape == (2, 24)
