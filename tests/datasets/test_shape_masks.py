"""Each built-in shape's pixel mask and box: they cover the shape's coloured pixels and nothing of another shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polymodal.datasets import ShapeSample, make_shape_sample, shape_masks, shape_pointing_samples
from polymodal.datasets.synthetic_shapes import COLOUR_RGB


def distance(image: np.ndarray, rgb) -> np.ndarray:
    return np.abs(image.astype(np.float32) - np.asarray(rgb, np.float32)).max(-1)  # (H, W), per-channel max


def interior(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` whose four neighbours are in it too."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


@pytest.mark.parametrize("options", [{}, {"two_shape_share": 1.0}, {"relation_share": 1.0, "max_rotation": 45.0}])
def test_masks_cover_the_shapes_coloured_pixels_and_sit_in_their_boxes(options):
    for index in range(40):
        sample = make_shape_sample(index, "train", seed=5, image_size=48, **options)
        image, masks = np.asarray(sample.image), shape_masks(sample)
        assert masks.shape == (sample.attrs["num_shapes"], 48, 48) and masks.dtype == bool
        background = np.median(image[~masks.any(0)], axis=0)
        for s, mask in zip(sample.attrs["shapes"], masks):
            assert mask.any(), (index, sample.caption)
            x0, y0, x1, y1 = s["box"]
            assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
            to_colour = distance(image, COLOUR_RGB[s["colour"]])
            # every pixel painted in the shape's colour (within its jitter and the noise) is in the mask ...
            assert mask[to_colour < 30].all(), (index, s)
            # ... and inside its edge (where pixels are between half and fully covered) the mask holds only pixels
            # nearer that colour than the background
            assert (to_colour < distance(image, background))[interior(mask)].all(), (index, s)


def test_two_shape_masks_do_not_overlap_and_split_along_the_halves():
    for index in range(40):
        sample = make_shape_sample(index, "train", seed=6, image_size=64, two_shape_share=1.0)
        first, second = shape_masks(sample, threshold=1e-6)  # every touched pixel
        assert not (first & second).any()
        horizontal = sample.attrs["shapes"][0]["position"] == "left"
        axis = 1 if horizontal else 0
        assert np.nonzero(first)[axis].max() < 32 <= np.nonzero(second)[axis].min()


def test_boxes_are_json_and_masks_need_a_generated_sample():
    sample = make_shape_sample(3, "heldout", seed=0)
    assert json.loads(json.dumps(sample.attrs)) == sample.attrs
    assert all(len(s["box"]) == 4 and all(isinstance(v, int) for v in s["box"]) for s in sample.attrs["shapes"])
    assert make_shape_sample(3, "heldout", seed=0) == sample  # the coverage takes no part in equality
    with pytest.raises(ValueError, match="no coverage"):
        shape_masks(ShapeSample(sample.image, sample.caption, sample.attrs))
    with pytest.raises(ValueError, match="threshold"):
        shape_masks(sample, threshold=0.0)


def test_filled_masks_close_a_rings_hole_and_leave_other_shapes_alone():
    rings = 0
    for index in range(60):
        sample = make_shape_sample(index, "heldout", seed=7, image_size=48)
        (mask,), (filled,) = shape_masks(sample), shape_masks(sample, fill_holes=True)
        assert (filled >= mask).all()
        x0, y0, x1, y1 = sample.attrs["shapes"][0]["box"]
        centre = filled[(y0 + y1) // 2, (x0 + x1) // 2]
        if sample.attrs["shape"] == "ring":
            rings += 1
            assert centre and not mask[(y0 + y1) // 2, (x0 + x1) // 2] and filled.sum() > 1.2 * mask.sum()
        else:
            assert (filled == mask).all(), sample.attrs["shape"]
    assert rings >= 5


def test_pointing_samples_name_one_of_two_shapes_alternately():
    samples = shape_pointing_samples(12, seed=3, image_size=48)
    assert [s.index for s in samples] == list(range(12))
    for s in samples:
        sample = make_shape_sample(s.index, "train", 3, image_size=48, two_shape_share=1.0)
        named = sample.attrs["shapes"][s.index % 2]
        assert s.text == f"{'an' if named['colour'][0] in 'aeiou' else 'a'} {named['colour']} {named['shape']}"
        masks = shape_masks(sample)
        assert (s.mask == masks[s.index % 2]).all() and (s.other_mask == masks[1 - s.index % 2]).all()
        assert (s.region >= s.mask).all() and not (s.region & s.other_mask).any()
    assert shape_pointing_samples(2, seed=3, image_size=48, start=5)[0].text == samples[5].text
