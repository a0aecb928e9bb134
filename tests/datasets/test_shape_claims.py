from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from polymodal.datasets import COLOURS, SHAPES
from polymodal.datasets.shape_claims import ShapeClaimsDataset, make_claim
from polymodal.datasets.synthetic_shapes import SEEN_COMBOS, UNSEEN_COMBOS


def mismatch_distribution(wrong):
    """P(claimed combination | mismatch), computed exactly from the construction in the module docstring."""
    seen = set(SEEN_COMBOS)
    prob = Counter()
    for shape, colour in SEEN_COMBOS:  # the image's combination, uniform
        for attribute in wrong:  # which attribute the claim gets wrong, uniform
            if attribute == "colour":
                options = [(shape, c) for c in COLOURS if c != colour and (shape, c) in seen]
            else:
                options = [(s, colour) for s in SHAPES if s != shape and (s, colour) in seen]
            for claim in options:
                prob[claim] += Fraction(1, len(SEEN_COMBOS)) / len(wrong) / len(options)
    return prob


@pytest.mark.parametrize("wrong", [("shape", "colour"), ("colour",), ("shape",)])
def test_a_false_claim_is_distributed_like_a_true_one(wrong):
    # A true claim is the image's combination: uniform over the seen ones. A false one must be too,
    # or the claim alone would hint at the answer.
    prob = mismatch_distribution(wrong)
    assert set(prob) == set(SEEN_COMBOS)
    assert set(prob.values()) == {Fraction(1, len(SEEN_COMBOS))}


def test_claims_follow_the_construction():
    rng = np.random.default_rng(0)
    images = [SEEN_COMBOS[i] for i in rng.integers(len(SEEN_COMBOS), size=6000)]
    claims = [make_claim(shape, colour, rng) for shape, colour in images]
    kinds = Counter(c["claim_kind"] for c in claims)
    assert abs(kinds["true"] / len(claims) - 0.5) < 0.03
    assert abs(kinds["wrong shape"] - kinds["wrong colour"]) / len(claims) < 0.04
    for (shape, colour), claim in zip(images, claims):
        claimed = (claim["claim_shape"], claim["claim_colour"])
        assert claimed in SEEN_COMBOS
        assert claim["verdict"] == ("match" if claimed == (shape, colour) else "mismatch")
        assert claim["claim_kind"] == "true" or (
            (claimed[0] != shape) == (claim["claim_kind"] == "wrong shape")
            and (claimed[1] != colour) == (claim["claim_kind"] == "wrong colour")
        )
        assert f"{claim['claim_colour']} {claim['claim_shape']}" in claim["caption"]
    # Empirically too, the claimed combination says nothing about the verdict.
    by_claim = Counter((c["claim_shape"], c["claim_colour"], c["verdict"]) for c in claims)
    matches = sum(by_claim[(*k, "match")] for k in SEEN_COMBOS)
    assert abs(matches / len(claims) - 0.5) < 0.03


def test_only_colour_claims():
    rng = np.random.default_rng(1)
    claims = [make_claim("circle", "red", rng, wrong=("colour",)) for _ in range(200)]
    assert {c["claim_kind"] for c in claims} == {"true", "wrong colour"}
    assert all(c["claim_shape"] == "circle" for c in claims)


def test_dataset_items_are_deterministic_and_heldout_avoids_unseen_combinations():
    tokenizer = lambda texts: np.array([[len(t)] for t in texts])  # noqa: E731 - any callable works
    ds = ShapeClaimsDataset("heldout", 30, seed=3, image_size=32, tokenizer=tokenizer)
    first = ds[4]
    again = ShapeClaimsDataset("heldout", 30, seed=3, image_size=32, tokenizer=tokenizer)[4]
    assert first["meta"] == again["meta"]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    assert first["text"][0] == len(first["meta"]["caption"])
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        assert (meta["shape"], meta["colour"]) not in UNSEEN_COMBOS
        assert meta["verdict"] == ("match" if meta["claim_kind"] == "true" else "mismatch")
    train = ShapeClaimsDataset("train", 5, seed=3, image_size=32)
    assert train[0]["image"].size == (32, 32)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="wrong must name distinct attributes"):
        ShapeClaimsDataset("train", 5, wrong=("size",))
    with pytest.raises(ValueError, match="split must be one of"):
        ShapeClaimsDataset("test", 5)
    with pytest.raises(ValueError, match="not one of the seen combinations"):
        make_claim(*UNSEEN_COMBOS[0], np.random.default_rng(0))
