"""``shape claims``: a shape image paired with a short claim about it, labelled ``match`` or ``mismatch``.

A task that needs both modalities. The image is a built-in ``shapes`` image of one shape (a
(shape, colour) combination ``I`` drawn uniformly from ``SEEN_COMBOS``); the claim names a
combination ``K`` ("a red circle", "there is a red circle", ...). With probability 1/2 the claim is
true (``K = I``). Otherwise it is wrong in exactly one attribute, chosen with probability 1/2 each:
the colour (``K`` = the same shape in another colour, uniform over the other seen colours of that
shape) or the shape (the same colour on another shape, uniform over the other seen shapes of that
colour).

Why neither modality alone can beat chance. The label is drawn independently of the image, so
``P(match | image) = 1/2``. The claim is uniform over ``SEEN_COMBOS`` whatever the label: when
true it is ``I`` itself (uniform); when false, for any combination ``K`` the images that can lead
to it are the other seen colours of ``K``'s shape (``n_s - 1`` of them, each picked with
probability ``1/(n_s - 1)``) and the other seen shapes of ``K``'s colour (likewise), so
``P(K | mismatch) = 1/2 * (n_s - 1) * 1/|SEEN| * 1/(n_s - 1) + 1/2 * (m_c - 1) * 1/|SEEN| * 1/(m_c - 1)
= 1/|SEEN|``. The wording is drawn independently of everything else. So ``P(match | claim) = 1/2``
too, and the best image-only or text-only classifier is right half the time; a classifier that
sees both and checks shape *and* colour can be right every time.

Items: ``{"image": ..., "text": token ids of the claim (with a tokenizer), "meta": {"caption": the
claim, "verdict": "match" | "mismatch", "claim_kind": "true" | "wrong colour" | "wrong shape",
"claim_shape", "claim_colour", "shape", "colour", ...}}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .synthetic import check_split, dataset_index, with_article
from .synthetic_shapes import HELDOUT_UNSEEN_EVERY, SEEN_COMBOS, make_shape_sample

__all__ = ["ATTRIBUTES", "CLAIM_TEMPLATES", "VERDICTS", "ShapeClaimsDataset", "make_claim"]

VERDICTS = ("mismatch", "match")
ATTRIBUTES = ("shape", "colour")  # what a false claim can get wrong
CLAIM_TEMPLATES = ("{}", "there is {}", "a picture of {}", "this shows {}", "the shape is {}")
_CLAIM_STREAM = 101  # keeps the claim's random numbers apart from the image's (see sample_rng)


def _check_wrong(wrong: tuple[str, ...]) -> tuple[str, ...]:
    wrong = tuple(wrong) if not isinstance(wrong, str) else (wrong,)
    if not wrong or any(a not in ATTRIBUTES for a in wrong) or len(set(wrong)) < len(wrong):
        raise ValueError(f"wrong must name distinct attributes out of {ATTRIBUTES}, got {wrong!r}")
    return wrong


def _others(combo: tuple[str, str], attribute: int) -> list[tuple[str, str]]:
    """Seen combinations equal to ``combo`` except in ``attribute`` (0: shape, 1: colour)."""
    keep = 1 - attribute
    return [c for c in SEEN_COMBOS if c[keep] == combo[keep] and c[attribute] != combo[attribute]]


def make_claim(
    shape: str, colour: str, rng: np.random.Generator, wrong: tuple[str, ...] = ("shape", "colour")
) -> dict[str, Any]:
    """A claim about an image showing ``colour`` ``shape``: true, wrong in colour, or wrong in shape.

    Args:
        shape: the shape the image shows.
        colour: its colour.
        rng: the claim's own random generator.
        wrong: the attributes a false claim may get wrong, each equally likely.

    Returns:
        ``{"caption", "verdict", "claim_kind", "claim_shape", "claim_colour"}``.
    """
    wrong = _check_wrong(wrong)
    if (shape, colour) not in SEEN_COMBOS:
        raise ValueError(f"({shape!r}, {colour!r}) is not one of the seen combinations a claim is built for")
    if rng.random() < 0.5:
        kind, claimed = "true", (shape, colour)
    else:
        attribute = wrong[int(rng.integers(len(wrong)))] if len(wrong) > 1 else wrong[0]
        kind = f"wrong {attribute}"
        options = _others((shape, colour), ATTRIBUTES.index(attribute))
        claimed = options[int(rng.integers(len(options)))]
    template = CLAIM_TEMPLATES[int(rng.integers(len(CLAIM_TEMPLATES)))]
    return {
        "caption": template.format(with_article(f"{claimed[1]} {claimed[0]}")),
        "verdict": VERDICTS[kind == "true"],
        "claim_kind": kind,
        "claim_shape": claimed[0],
        "claim_colour": claimed[1],
    }


class ShapeClaimsDataset(Dataset):
    """Map-style dataset of ``n`` (shape image, claim) pairs generated on the fly; see the module docstring.

    The ``"heldout"`` split uses the held-out shape images of seen combinations only (it skips the
    indices that show an unseen combination), so it shares no image with ``"train"``.

    Args:
        split: ``"train"`` or ``"heldout"``.
        n: number of samples.
        seed: data set seed.
        image_size: image side in pixels.
        transform: applied to the PIL image.
        tokenizer: maps a list of strings to ``(B, L)`` token ids.
        antialias: smooth shape edges.
        max_rotation: largest rotation of a shape in degrees either way.
        wrong: the attributes a false claim may get wrong (``("colour",)``: only colours, an
            easier task that small models learn sooner; neither modality alone helps either way).
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 10000,
        seed: int = 0,
        image_size: int = 64,
        transform: Callable[[Image.Image], Any] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        antialias: bool = True,
        max_rotation: float = 0.0,
        wrong: tuple[str, ...] | list[str] = ("shape", "colour"),
    ) -> None:
        self.wrong = _check_wrong(wrong)
        self.split_id = check_split(split)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.split, self.n, self.seed = split, n, seed
        self.options = {
            "image_size": image_size,
            "antialias": antialias,
            "two_shape_share": 0.0,
            "max_rotation": max_rotation,
        }
        self.transform = transform
        self.tokenizer = tokenizer
        make_shape_sample(self._image_index(0), split, seed, **self.options)  # reject bad options now

    def _image_index(self, index: int) -> int:
        if self.split_id == 0:
            return index
        # Held-out indices 0, 3, 6, ... show unseen combinations; use 1, 2, 4, 5, 7, 8, ...
        per = HELDOUT_UNSEEN_EVERY - 1
        return HELDOUT_UNSEEN_EVERY * (index // per) + 1 + index % per

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = dataset_index(index, self.n, type(self).__name__)
        sample = make_shape_sample(self._image_index(index), self.split, self.seed, **self.options)
        rng = np.random.default_rng([self.seed, _CLAIM_STREAM, self.split_id, index])
        claim = make_claim(sample.attrs["shape"], sample.attrs["colour"], rng, self.wrong)
        item: dict[str, Any] = {"image": self.transform(sample.image) if self.transform else sample.image}
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([claim["caption"]])[0]
        item["meta"] = {"index": index, **sample.attrs, "image_caption": sample.caption, **claim}
        return item
