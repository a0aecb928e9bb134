"""Relation scenes of the built-in shapes: captions that are true of the pixels, their wrong versions,
held-out shape pairs, and hard negatives that start with the swap."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from polymodal.datasets.synthetic import sample_rng
from polymodal.datasets.synthetic_shapes import (
    COLOUR_RGB,
    COLOURS,
    SEEN_COMBOS,
    UNSEEN_PAIRS,
    ShapesDataset,
    caption_vocabulary,
    hard_negative_captions,
    make_shape_sample,
)

# Written from the wording, not from the generator's tables.
_STATEMENT = re.compile(
    r"^(?:a picture of |there is )?an? (\w+) (\w+) (?:is )?"
    r"(to the left of|to the right of|above|below|bigger than|smaller than) an? (\w+) (\w+)$"
)


def parse(caption: str) -> tuple[tuple[str, str], str, tuple[str, str]]:
    """((colour, shape) of the subject, relation words, (colour, shape) of the object)."""
    match = _STATEMENT.match(caption)
    assert match, caption
    c1, s1, relation, c2, s2 = match.groups()
    return (c1, s1), relation, (c2, s2)


def colour_blobs(image: np.ndarray) -> dict[str, tuple[float, float, int]]:
    """Per colour clearly present: (mean x, mean y, extent: the longer side of its bounding box), from the
    pixels alone. Extent, not area: a big star covers fewer pixels than a small square."""
    pixels = image.astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    fg = np.abs(pixels - np.median(border, axis=0)).sum(-1) > 90
    palette = np.asarray([COLOUR_RGB[c] for c in COLOURS], np.float32)
    distance = np.square(pixels[..., None, :] - palette).sum(-1)  # (H, W, colours)
    # only pixels close to a palette colour: blended edges and noise are left out
    close = (distance.argmin(-1)[..., None] == np.arange(len(COLOURS))) & (distance < 45.0**2)
    blobs = {}
    for k, colour in enumerate(COLOURS):
        ys, xs = np.nonzero(fg & close[..., k])
        if len(xs) >= 4:
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            blobs[colour] = (float(xs.mean()), float(ys.mean()), int(extent))
    return blobs


def holds(relation: str, a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    (ax, ay, an), (bx, by, bn) = a, b
    return {
        "to the left of": ax < bx,
        "to the right of": ax > bx,
        "above": ay < by,
        "below": ay > by,
        "bigger than": an > 1.25 * bn,
        "smaller than": bn > 1.25 * an,
    }[relation]


def relation_samples(split: str, n: int, seed: int = 0, share: float = 0.5, size: int = 64):
    out = [make_shape_sample(i, split, seed=seed, image_size=size, relation_share=share) for i in range(n)]
    return [s for s in out if "relation" in s.attrs]


def test_relation_captions_are_true_of_the_pixels_and_their_swaps_are_not():
    relations = Counter()
    for sample in relation_samples("train", 400, seed=3):
        subject, relation, obj = parse(sample.caption)
        blobs = colour_blobs(np.asarray(sample.image))
        assert subject[0] in blobs and obj[0] in blobs, sample.caption
        assert holds(relation, blobs[subject[0]], blobs[obj[0]]), sample.caption
        swap = sample.attrs["wrong_captions"]["swap"]
        assert sorted(swap.split()) == sorted(sample.caption.split()) and swap != sample.caption
        s2, r2, o2 = parse(swap)
        assert (s2, r2, o2) == (obj, relation, subject) and not holds(r2, blobs[s2[0]], blobs[o2[0]])
        colours = sample.attrs["wrong_captions"]["colours"]
        assert parse(colours) == ((obj[0], subject[1]), relation, (subject[0], obj[1]))
        assert sample.attrs["mentions"] == ["relation"] and sample.attrs["num_shapes"] == 2
        assert sample.attrs["shape"] is None
        # the canonical statement (what retrieval matches on) is true and puts the left, top or bigger one first
        c_subject, c_relation, c_obj = parse(sample.attrs["relation"])
        assert c_relation in ("to the left of", "above", "bigger than")
        layouts = {"to the left of": "horizontal", "above": "vertical", "bigger than": "size"}
        assert sample.attrs["layout"] == layouts[c_relation]
        assert holds(c_relation, blobs[c_subject[0]], blobs[c_obj[0]])
        assert {c_subject, c_obj} == {subject, obj}
        relations[relation] += 1
    assert len(relations) == 6 and min(relations.values()) > 15, relations


def test_relation_scenes_hold_out_shape_pairs():
    train = relation_samples("train", 1500, share=1.0, size=32)
    assert len(train) == 1500
    unseen = {frozenset(p) for p in UNSEEN_PAIRS}
    for sample in train:
        pair = frozenset(s["shape"] for s in sample.attrs["shapes"])
        assert len(pair) == 2 and pair not in unseen and not sample.attrs["unseen"]
        for s in sample.attrs["shapes"]:
            assert (s["shape"], s["colour"]) in SEEN_COMBOS
    held = relation_samples("heldout", 600, share=0.5, size=32)
    assert 240 < len(held) < 360
    flagged = [frozenset(s["shape"] for s in x.attrs["shapes"]) in unseen for x in held]
    assert flagged == [x.attrs["unseen"] for x in held]
    assert 0.4 < np.mean(flagged) < 0.6
    # the single-shape held-out images keep their unseen-combination rule
    singles = [make_shape_sample(i, "heldout", image_size=32, relation_share=0.5) for i in range(60)]
    assert any(s.attrs["unseen"] for s in singles if s.attrs["num_shapes"] == 1)


def test_relation_share_zero_changes_nothing_and_is_checked():
    for i in range(20):
        a = make_shape_sample(i, "train", seed=1, image_size=32)
        b = make_shape_sample(i, "train", seed=1, image_size=32, relation_share=0.0)
        assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"relation_share must be in \[0, 1\]"):
            make_shape_sample(0, relation_share=bad)
    with pytest.raises(ValueError, match="relation_share"):
        ShapesDataset(n=2, relation_share=2.0)
    words = set(caption_vocabulary())
    for sample in relation_samples("train", 60, size=32):
        assert set(sample.caption.split()) <= words


def test_relation_hard_negatives_start_with_the_swap_and_are_all_wrong():
    for index, sample in enumerate(relation_samples("train", 200, seed=2, size=32)):
        rng = sample_rng("shapes-negatives", 2, "train", index)
        negatives = hard_negative_captions(sample.caption, sample.attrs, 5, rng)
        wrong = sample.attrs["wrong_captions"]
        assert negatives[:2] == [wrong["swap"], wrong["colours"]]
        subject, relation, obj = parse(sample.caption)
        opposite = parse(negatives[2])
        assert opposite[0] == subject and opposite[2] == obj and opposite[1] != relation
        assert len(set(negatives)) == 5 and sample.caption not in negatives
        truth = {(subject, relation, obj)}
        for negative in negatives[3:]:  # one colour or shape replaced: a pair the image does not show
            s, r, o = parse(negative)
            assert r == relation and (s, o) != (subject, obj) and (s, r, o) not in truth


def test_relation_scenes_through_the_dataset():
    from polymodal.encoders import CLIPTokenizer

    tokenizer = CLIPTokenizer(context_length=24)
    data = ShapesDataset(
        "heldout", n=40, seed=0, image_size=32, tokenizer=tokenizer, relation_share=1.0, hard_negatives=3
    )
    item = data[5]
    assert item["text_negatives"].shape == (3, 24)
    assert item["meta"]["hard_negatives"][0] == item["meta"]["wrong_captions"]["swap"]
    assert item["meta"]["caption"] == make_shape_sample(5, "heldout", 0, 32, relation_share=1.0).caption
