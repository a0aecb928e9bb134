"""Held-out evaluation: which items count as right answers to a caption."""

import torch

from polymodal.datasets import ShapesDataset
from polymodal.tasks import retrieval_metrics
from polymodal.train.evaluate import caption_matches


def test_without_mentions_identical_captions_match_each_other():
    meta = [{"caption": c} for c in ["a red circle", "a blue star", "a red circle", "a red ring"]]
    same = [[0, 2], [1], [0, 2], [3]]
    assert caption_matches(meta) == (same, same)
    # without captions only the pair itself counts
    assert caption_matches([{"index": 0}, {"index": 1}]) == ([[0], [1]], [[0], [1]])


def test_an_item_fits_every_caption_whose_stated_attributes_it_has():
    meta = [
        {"shape": "circle", "colour": "red", "size": "small", "mentions": ["shape", "colour"]},
        {"shape": "circle", "colour": "red", "size": "large", "mentions": ["shape", "colour", "size"]},
        {"shape": "circle", "colour": "blue", "size": "small", "mentions": ["colour"]},
        {"shape": "star", "colour": "red", "size": "small", "mentions": ["shape", "colour", "size"]},
    ]
    text_to_item, item_to_text = caption_matches(meta)
    # a naive reference: item j fits caption i iff it agrees on every attribute caption i states
    for i, q in enumerate(meta):
        expected = [j for j, m in enumerate(meta) if all(m[a] == q[a] for a in q["mentions"])]
        assert text_to_item[i] == expected
    assert text_to_item == [[0, 1], [1], [2], [3]]
    assert item_to_text == [[0], [0, 1], [2], [3]]


def test_heldout_shapes_are_matched_by_what_their_captions_say():
    meta = [ShapesDataset("heldout", 300, seed=0)[i]["meta"] for i in range(300)]
    text_to_item, item_to_text = caption_matches(meta)
    for i, m in enumerate(meta):
        assert i in text_to_item[i] and i in item_to_text[i]
        for j in text_to_item[i]:
            for attr in m["mentions"]:
                assert meta[j][attr] == m[attr] and str(m[attr]) in m["caption"]
    # the short captions ("a red circle") are answered by every image of that colour and shape
    short = next(i for i, m in enumerate(meta) if m["mentions"] == ["shape", "colour"])
    same = [j for j, m in enumerate(meta) if (m["shape"], m["colour"]) == (meta[short]["shape"], meta[short]["colour"])]
    assert text_to_item[short] == same


def test_duplicate_captions_do_not_count_as_misses():
    """Two images fit "a red circle" equally; a one-to-one relevance would call one of the two
    queries a miss at R@1 by a coin flip, counting every fitting image as right does not."""
    captions = ["a red circle", "a red circle", "a blue star", "a green ring"]
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    image = text.clone()
    image[1] += 1e-3  # image 1 scores a hair higher than image 0 for both "a red circle" queries
    text_to_item, _ = caption_matches([{"caption": c} for c in captions])
    assert retrieval_metrics(text, image, torch.arange(4), ks=(1,))["R@1"] == 0.75
    assert retrieval_metrics(text, image, text_to_item, ks=(1,))["R@1"] == 1.0
