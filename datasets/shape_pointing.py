"""The pointing game's data: built-in two-shape images, a text naming one of the shapes, and that shape's mask.

Image ``i`` is ``make_shape_sample(i, "train", seed, two_shape_share=1.0)`` (held-out images hold one shape
only, so a seed the model did not train on holds these out); its text names shape ``i % 2``, so the left
(or top) and the right (or bottom) shape are named equally often, and only the plain phrase ("a red
circle"): the other shape differs in both colour and shape, so the text picks out one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .synthetic import with_article
from .synthetic_shapes import make_shape_sample, shape_masks

__all__ = ["PointingSample", "shape_pointing_samples"]


@dataclass(frozen=True)
class PointingSample:
    """One image of the pointing game.

    Attributes:
        image: RGB image with two shapes.
        text: the phrase naming one of them, e.g. ``"a red circle"``.
        mask: ``(H, W)`` bool, the named shape's pixels (``shape_masks``).
        region: ``(H, W)`` bool, the region inside the named shape's outline: its pixels and, for a ring, its
            hole (``shape_masks(..., fill_holes=True)``); a point in a ring's hole points at the ring.
        other_mask: ``(H, W)`` bool, the other shape's pixels.
        index: the sample's index in the generator.
    """

    image: Image.Image
    text: str
    mask: np.ndarray
    region: np.ndarray
    other_mask: np.ndarray
    index: int


def shape_pointing_samples(n: int, seed: int, image_size: int = 64, start: int = 0) -> list[PointingSample]:
    """``n`` pointing-game samples, indices ``start .. start + n - 1`` of the two-shape generator with ``seed``.

    Args:
        n: how many.
        seed: the generator's data seed; pick one the model was not trained on (training uses ``data.seed``).
        image_size: side of the images in pixels: the model's input size, so that maps and masks align.
        start: the first index.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    out = []
    for index in range(start, start + n):
        sample = make_shape_sample(index, "train", seed, image_size=image_size, two_shape_share=1.0)
        masks, named = shape_masks(sample), index % 2
        region = shape_masks(sample, fill_holes=True)[named]
        s = sample.attrs["shapes"][named]
        text = with_article(f"{s['colour']} {s['shape']}")
        out.append(PointingSample(sample.image, text, masks[named], region, masks[1 - named], index))
    return out
