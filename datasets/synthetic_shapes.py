"""``shapes``: coloured geometric shapes with captions, the data the image demo learns from.

Each image shows one of 6 shapes in one of 8 colours on a dark, lightly noisy background, at one
of two sizes, in one of 9 positions; training images can also show two shapes ("two shapes: a
yellow triangle and a purple cross", ``two_shape_share``). Captions always name the shape and
colour of every shape, in varied wording ("a red circle", "a small blue square in the top left",
"a picture of a green star", ...), and mostly name nothing else (see ``_SINGLE_TEMPLATES``). The
shapes are chosen to differ even at 48 x 48 pixels seen as 8-pixel patches (a ring's hole, a star's
spikes, a cross's thin arms) and stay upright unless ``max_rotation`` is set.

With ``relation_share`` above 0, that share of images (training and held-out) shows two shapes whose
caption states how they relate: one to the left of, to the right of, above or below the other, or
bigger or smaller than it ("a red circle is to the left of a blue star"). Such a caption and its swap
("a blue star is to the left of a red circle") have the same words, so only a model that reads word
order and sees where things are can tell them apart; each of these samples carries its wrong versions
(``wrong_captions``) to measure that. The 3 shape pairs in ``UNSEEN_PAIRS`` are never shown together in
a training relation scene, and half of the held-out relation scenes show one of them.

Compositional generalisation is built in: the 8 (shape, colour) combinations in ``UNSEEN_COMBOS``
never occur in the ``"train"`` split, not even as one of two shapes. The ``"heldout"`` split holds
single-shape images only, captioned with the same templates as training; every third of them
(indices 0, 3, 6, ...) shows an unseen combination. Each sample's ``mentions`` lists what its
caption states, so retrieval can count every image that fits a caption as a right answer.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .synthetic import check_split, dataset_index, sample_rng, with_article

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "HELDOUT_UNSEEN_EVERY",
    "POSITIONS",
    "RELATIONS",
    "SEEN_COMBOS",
    "SHAPES",
    "SIZES",
    "UNSEEN_COMBOS",
    "UNSEEN_PAIRS",
    "ShapeSample",
    "ShapesDataset",
    "caption_vocabulary",
    "colour_prompts",
    "combo_prompts",
    "make_shape_sample",
    "shape_masks",
    "shape_prompts",
    "single_shape_captions",
]

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOUR_RGB = {
    "red": (225, 30, 30),
    "green": (30, 185, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 225, 30),
    "purple": (150, 50, 215),
    "orange": (255, 135, 0),
    "cyan": (0, 215, 225),
    "white": (240, 240, 240),
}
COLOURS = tuple(COLOUR_RGB)
SIZES = ("small", "large")
# 3 x 3 grid of positions, rows top to bottom.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
# Every colour once and every shape at most twice, so each attribute is still seen with most partners.
UNSEEN_COMBOS = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "cyan"),
    ("triangle", "white"),
    ("star", "green"),
    ("cross", "red"),
    ("ring", "blue"),
    ("ring", "yellow"),
)
SEEN_COMBOS = tuple(c for c in itertools.product(SHAPES, COLOURS) if c not in UNSEEN_COMBOS)
# Relation scenes: the relation a caption states, as words, for each of the three layouts.
RELATIONS = ("left", "right", "above", "below", "bigger", "smaller")
_RELATION_WORDS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
    "bigger": "bigger than",
    "smaller": "smaller than",
}
_OPPOSITE = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "bigger": "smaller",
    "smaller": "bigger",
}
# Unordered shape pairs never shown together in a training relation scene; each shape is in one, so
# every shape is still seen beside 4 of the 5 others.
UNSEEN_PAIRS = (("circle", "star"), ("square", "cross"), ("triangle", "ring"))
# Radius ranges of the bigger and the smaller shape of a size scene: each fits half the image, and a big
# square (the narrowest for its radius) still looks 1.5 times as wide as a small circle.
_SIZE_SCENE_RADIUS = {"large": (0.17, 0.195), "small": (0.065, 0.08)}
HELDOUT_UNSEEN_EVERY = 3  # held-out index i shows an unseen combination iff i % 3 == 0
TRAIN_TWO_SHAPE_SHARE = 0.0  # opt in: see the module docstring

# Radius ranges as fractions of the image side; small and large never overlap.
_RADIUS = {"small": (0.15, 0.19), "large": (0.26, 0.32)}
# Where in its allowed range a shape's centre lies for each third of the grid: near the low end,
# the middle or the high end, with gaps between, so neighbouring positions are never confused.
_THIRDS = ((0.0, 0.22), (0.39, 0.61), (0.78, 1.0))
_PHRASE = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_ROTATES = ("square", "triangle", "star", "cross")  # circles and rings look the same at any angle
_SUPERSAMPLE = 4

# {a_colour} = "a red", {a_size} = "a small", {a_shape} = "a circle", {where} = "in the top left".
# Two thirds of the templates name only colour and shape. A caption that also gives size and
# position can be told apart from almost every other caption in a batch without looking at the
# shape (only ~1 in 144 others shares colour, size and position), which leaves contrastive training
# little reason to learn shapes; "a red circle" must be told apart from the ~1 in 8 others that are
# red, which it can only do by shape. (In 300 steps: 54% zero-shot shape accuracy when most
# captions gave size and position, 79% when none did.)
_SINGLE_TEMPLATES = (
    "{a_colour} {shape}",
    "{colour} {shape}",
    "a picture of {a_colour} {shape}",
    "an image of {a_colour} {shape}",
    "there is {a_colour} {shape}",
    "{a_shape} coloured {colour}",
    "a drawing of {a_colour} {shape}",
    "{a_shape} that is {colour}",
    "{a_size} {colour} {shape}",
    "{a_colour} {shape} {where}",
    "{a_size} {colour} {shape} {where}",
    "{size} {colour} {shape} {where} on a dark background",
)
# {first} / {second} = "a red circle"; {relation} = "to the left of", "below", "bigger than", ...
_RELATION_TEMPLATES = (
    "{first} {relation} {second}",
    "{first} is {relation} {second}",
    "a picture of {first} {relation} {second}",
    "there is {first} {relation} {second}",
)
# {first} / {second} = "a red circle"; {relation} = "to the left of" or "above".
_PAIR_TEMPLATES = (
    "two shapes: {first} and {second}",
    "{first} and {second}",
    "{first} {relation} {second}",
    "a picture of {first} next to {second}",
    "{first} and {second} on a dark background",
)


@dataclass(frozen=True)
class ShapeSample:
    """One generated image with its caption.

    Attributes:
        image: RGB image.
        caption: text naming the shape and colour of every shape in the image.
        attrs: JSON-able labels. ``shape``, ``colour``, ``size``, ``position``: those of the one
            shape, or ``None`` in two-shape images; ``num_shapes``; ``shapes``: a list with a dict
            (``shape``, ``colour``, ``size``, ``position``, and ``box``: ``[x0, y0, x1, y1]``, the pixels
            ``x0 <= x < x1``, ``y0 <= y < y1`` holding every pixel the shape touches) per shape, left or top
            one first;
            ``unseen``: whether the image shows a combination from ``UNSEEN_COMBOS``; ``mentions``:
            the attributes the caption states (``shape``, ``colour`` and perhaps ``size`` and
            ``position``; ``shapes`` for two-shape images; ``relation`` for relation scenes), so that
            retrieval can count every image that fits a caption as a match. Relation scenes also have
            ``relation``: the scene's canonical statement (the same for every caption that fits it),
            ``layout``: ``horizontal`` (left / right), ``vertical`` (above / below) or ``size`` (bigger /
            smaller), and
            ``wrong_captions``: ``{"swap": the two shapes swapped, "colours": their colours exchanged}``,
            the caption's own wording each time; ``unseen`` then means a pair from ``UNSEEN_PAIRS``.
        coverage: ``(num_shapes, H, W)`` float32 in [0, 1], the fraction of each pixel each shape covers, in
            the order of ``attrs["shapes"]``: what the image was painted with (``shape_masks`` thresholds it).
    """

    image: Image.Image
    caption: str
    attrs: dict[str, Any]
    coverage: np.ndarray | None = field(default=None, repr=False, compare=False)


def shape_prompts() -> tuple[list[str], list[str]]:
    """Class names and prompt templates for zero-shot shape classification.

    The templates follow the captions' shortest wording ("a red circle") once per colour, so the
    averaged prompt embedding of a shape covers every colour and favours none.
    """
    return list(SHAPES), [f"{with_article(colour)} {{}}" for colour in COLOURS]


def colour_prompts() -> tuple[list[str], list[str]]:
    """Class names and prompt templates for zero-shot colour classification ("{} circle", one per shape)."""
    return list(COLOURS), [f"{{}} {shape}" for shape in SHAPES]


def combo_prompts() -> tuple[list[str], list[str]]:
    """Class names (``"red circle"``, shape-major order) and the template for all 48 combinations."""
    return [f"{colour} {shape}" for shape, colour in itertools.product(SHAPES, COLOURS)], ["{}"]


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` inscribed in the circle of radius ``r`` around ``(cx, cy)``."""
    if shape == "square":
        polar = [(r, math.radians(45 + 90 * k)) for k in range(4)]
    elif shape == "triangle":
        # Slightly enlarged: an inscribed equilateral triangle covers much less area than the other shapes.
        polar = [(1.05 * r, math.radians(-90 + 120 * k)) for k in range(3)]
    elif shape == "star":
        polar = [(r if k % 2 == 0 else 0.38 * r, math.radians(-90 + 36 * k)) for k in range(10)]
    elif shape == "cross":
        # A plus sign: arms of half-width w reaching to r, traced as 12 corners. Thin arms keep a
        # small cross from looking like a blob (that is, a circle) at low resolution.
        w = 0.26 * r
        corners = [
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
        ]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    rot = math.radians(angle)
    return [(cx + d * math.cos(a + rot), cy + d * math.sin(a + rot)) for d, a in polar]


def _coverage(shape: str, cx: float, cy: float, r: float, angle: float, size: int, antialias: bool) -> np.ndarray:
    """Fraction of each pixel the shape covers, ``(size, size)`` float32 in [0, 1]."""
    ss = _SUPERSAMPLE if antialias else 1
    mask = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(mask)
    # Pixel centres sit at +0.5, so shift by that before scaling up to the supersampled grid.
    cx, cy, r = (cx * ss - 0.5 * (ss - 1)), (cy * ss - 0.5 * (ss - 1)), r * ss
    if shape in ("circle", "ring"):
        rr = 0.9 * r
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        if shape == "ring":
            rr = 0.5 * rr
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=0)
    else:
        draw.polygon(_outline(shape, cx, cy, r, angle), fill=255)
    if ss > 1:
        mask = mask.reduce(ss)  # box filter: the exact covered fraction per output pixel
    return np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)


def _place(
    rng: np.random.Generator,
    size: int,
    box: tuple[float, float, float, float],
    kind: str,
    radius: tuple[float, float] | None = None,
) -> dict:
    """Draw radius, cell of the 3 x 3 grid and centre of one shape inside ``box`` (x0, y0, x1, y1); the
    radius range is ``kind``'s unless ``radius`` gives one."""
    lo, hi = radius or _RADIUS[kind]
    r = rng.uniform(lo, hi) * size
    margin = r + 0.05 * size  # triangles reach 1.05 r from their centre
    col, row = int(rng.integers(3)), int(rng.integers(3))
    centre = []
    for third, start, stop in ((col, box[0], box[2]), (row, box[1], box[3])):
        a, b = _THIRDS[third]
        low, high = start + margin, stop - margin
        centre.append(low + (high - low) * rng.uniform(a, b))
    return {"r": r, "cx": centre[0], "cy": centre[1], "position": POSITIONS[3 * row + col]}


def _render(rng: np.random.Generator, shapes: list[dict], coverage: np.ndarray, size: int) -> Image.Image:
    # Dark background with a slight random tint, so every colour (white included) stands out.
    level = rng.uniform(15, 55)
    background = np.clip(level + rng.uniform(-6, 6, size=3), 0, 255).astype(np.float32)
    pixels = np.broadcast_to(background, (size, size, 3)).copy()
    for s, alpha in zip(shapes, coverage):
        rgb = np.clip(np.asarray(COLOUR_RGB[s["colour"]], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        pixels += alpha[..., None] * (rgb.astype(np.float32) - pixels)
    # Uniform noise (std 1 to 4 grey levels): looks the same as Gaussian here and is 4x cheaper to draw.
    noise = rng.random((size, size, 3), dtype=np.float32) - np.float32(0.5)
    pixels += noise * np.float32(math.sqrt(12.0) * rng.uniform(1.0, 4.0))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _phrase(s: dict) -> str:
    return with_article(f"{s['colour']} {s['shape']}")


def _single_caption(rng: np.random.Generator, s: dict) -> tuple[str, list[str]]:
    """A caption for one shape and the attributes it states."""
    template = _SINGLE_TEMPLATES[int(rng.integers(len(_SINGLE_TEMPLATES)))]
    mentions = ["shape", "colour"] + ["size"] * ("size}" in template) + ["position"] * ("{where}" in template)
    return _single_caption_from(template, s), mentions


def _single_caption_from(template: str, s: dict) -> str:
    return template.format(
        a_colour=with_article(s["colour"]),
        colour=s["colour"],
        shape=s["shape"],
        a_shape=with_article(s["shape"]),
        a_size=with_article(s["size"]),
        size=s["size"],
        where=_PHRASE[s["position"]],
    )


def _pair_caption(rng: np.random.Generator, first: dict, second: dict, horizontal: bool) -> str:
    template = _PAIR_TEMPLATES[int(rng.integers(len(_PAIR_TEMPLATES)))]
    a, b = _phrase(first), _phrase(second)
    if "{relation}" not in template and rng.random() < 0.5:
        a, b = b, a  # order carries no meaning unless a relation is stated
    return template.format(first=a, second=b, relation="to the left of" if horizontal else "above")


def single_shape_captions(shape: str, colour: str, size: str, position: str) -> list[str]:
    """Every caption the templates give a one-shape image with these attributes, in template order.

    These are all the right captions of such an image, e.g. the references for scoring a generated
    caption.
    """
    s = {"shape": shape, "colour": colour, "size": size, "position": position}
    for key, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
        if s[key] not in allowed:
            raise ValueError(f"unknown {key} {s[key]!r}; expected one of {allowed}")
    return [_single_caption_from(template, s) for template in _SINGLE_TEMPLATES]


def _template_of(caption: str, render: Callable[[str], str], templates: tuple[str, ...]) -> str:
    for template in templates:
        if render(template) == caption:
            return template
    raise ValueError(f"caption {caption!r} was not made by the shapes templates")


def _relation_caption(template: str, first: dict, second: dict, relation: str) -> str:
    return template.format(first=_phrase(first), second=_phrase(second), relation=_RELATION_WORDS[relation])


def _relation_scene(rng: np.random.Generator, size: int, split_id: int) -> tuple[list[dict], str, dict]:
    """Two shapes in one of three layouts (side by side, one above the other, or a bigger and a smaller
    one side by side or stacked), the caption stating their relation, and the attributes only such
    scenes have (``relation``, ``wrong_captions``, ``unseen``)."""
    unseen = split_id == 1 and bool(rng.random() < 0.5)
    pairs = [p for p in itertools.combinations(SHAPES, 2) if (p in UNSEEN_PAIRS) == unseen]
    kinds = list(pairs[int(rng.integers(len(pairs)))])
    if rng.random() < 0.5:
        kinds.reverse()
    colours: list[str] = []
    for kind in kinds:  # each shape in a colour training shows it in, the two colours distinct
        allowed = [c for s, c in SEEN_COMBOS if s == kind and c not in colours]
        colours.append(allowed[int(rng.integers(len(allowed)))])
    layout = ("horizontal", "vertical", "size")[int(rng.integers(3))]
    horizontal = layout == "horizontal" or (layout == "size" and bool(rng.random() < 0.5))
    sizes = ["small", "small"]
    if layout == "size":
        sizes = ["large", "small"] if rng.random() < 0.5 else ["small", "large"]
    h = size / 2
    halves = [(0, 0, h, size), (h, 0, size, size)] if horizontal else [(0, 0, size, h), (0, h, size, size)]
    shapes = []
    for i, (kind, colour, box, big) in enumerate(zip(kinds, colours, halves, sizes)):
        placed = _place(rng, size, box, big, _SIZE_SCENE_RADIUS[big] if layout == "size" else None)
        placed["position"] = ("left", "right")[i] if horizontal else ("top", "bottom")[i]
        shapes.append({"shape": kind, "colour": colour, "size": big, **placed})
    # The canonical statement puts the left, top or bigger shape first; a caption may say it either way.
    if layout == "size":
        first, relation = (0 if sizes[0] == "large" else 1), "bigger"
    else:
        first, relation = 0, ("left" if horizontal else "above")
    canonical = (shapes[first], shapes[1 - first], relation)
    subject, other, said = canonical if rng.random() < 0.5 else (canonical[1], canonical[0], _OPPOSITE[relation])
    template = _RELATION_TEMPLATES[int(rng.integers(len(_RELATION_TEMPLATES)))]
    exchanged = ({**subject, "colour": other["colour"]}, {**other, "colour": subject["colour"]})
    extra = {
        "relation": _relation_caption(_RELATION_TEMPLATES[0], *canonical),
        "layout": layout,
        "wrong_captions": {
            "swap": _relation_caption(template, other, subject, said),
            "colours": _relation_caption(template, *exchanged, said),
        },
        "unseen": unseen,
    }
    return shapes, _relation_caption(template, subject, other, said), extra


def hard_negative_captions(caption: str, attrs: dict, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions that are wrong for the image ``caption`` describes, each close to it: the same template
    with one thing changed (NegCLIP-style hard negatives).

    - one shape: its colour or its shape swapped for another (``"a red circle"`` -> ``"a blue circle"``,
      ``"a red square"``), alternately;
    - a relation scene (``relation_share``): first the two shapes swapped (``"a red circle is above a blue
      star"`` -> ``"a blue star is above a red circle"``), then their colours exchanged, then the opposite
      relation (``"... below ..."``), then one colour or shape replaced;
    - two shapes in a stated relation (``two_shape_share``): first the two swapped, then their colours
      exchanged, then one colour or shape replaced;
    - two shapes without a relation (their order means nothing): colours exchanged, then replacements.

    Args:
        caption: the sample's caption.
        attrs: the sample's attributes (``ShapeSample.attrs``).
        n: how many to give (they may repeat when fewer distinct ones exist).
        rng: the generator that picks the replacements.
    """
    shapes = [dict(s) for s in attrs["shapes"]]
    fixed: list[str] = []
    if len(shapes) == 1:
        template = _template_of(caption, lambda t: _single_caption_from(t, shapes[0]), _SINGLE_TEMPLATES)

        def render(changed: list[dict]) -> str:
            return _single_caption_from(template, changed[0])

    elif attrs.get("relation"):
        found = [
            (t, r, order)
            for t in _RELATION_TEMPLATES
            for r in RELATIONS
            for order in (shapes, shapes[::-1])
            if _relation_caption(t, *order, r) == caption
        ]
        if not found:
            raise ValueError(f"caption {caption!r} was not made by the shapes relation templates")
        template, relation, order = found[0]
        shapes = [dict(s) for s in order]  # in the caption's order

        def render(changed: list[dict]) -> str:
            return _relation_caption(template, *changed, relation)

        fixed = [attrs["wrong_captions"]["swap"], attrs["wrong_captions"]["colours"]]
        fixed.append(_relation_caption(template, *shapes, _OPPOSITE[relation]))
    else:
        relation = "to the left of" if shapes[0]["position"] == "left" else "above"

        def pair(t: str, first: dict, second: dict) -> str:
            return t.format(first=_phrase(first), second=_phrase(second), relation=relation)

        template, order = None, None
        for t in _PAIR_TEMPLATES:
            for candidate in (shapes, shapes[::-1]):
                if pair(t, *candidate) == caption:
                    template, order = t, candidate
        if template is None:
            raise ValueError(f"caption {caption!r} was not made by the shapes templates")
        shapes = [dict(s) for s in order]  # in the caption's order

        def render(changed: list[dict]) -> str:
            return pair(template, *changed)

        if "{relation}" in template:
            fixed.append(render(shapes[::-1]))
        exchanged = [{**shapes[0], "colour": shapes[1]["colour"]}, {**shapes[1], "colour": shapes[0]["colour"]}]
        fixed.append(render(exchanged))
    out = [c for c in fixed if c != caption][:n]
    while len(out) < n:
        changed = [dict(s) for s in shapes]
        target = changed[int(rng.integers(len(changed)))]
        key, pool = (("colour", COLOURS), ("shape", SHAPES))[len(out) % 2]
        others = [v for v in pool if v != target[key] and all(v != s[key] for s in changed)]
        target[key] = others[int(rng.integers(len(others)))]
        out.append(render(changed))
    return out


def sample_hard_negatives(sample: ShapeSample, index: int, split: str, seed: int, n: int) -> list[str]:
    """The ``n`` hard negatives of sample ``index`` of ``split`` (``hard_negative_captions``), drawn from a stream
    of their own, so asking for them changes no image or caption; ``ShapesDataset`` and the written files
    (``write_synthetic``) both take them from here, so they agree."""
    rng = sample_rng("shapes-negatives", seed, split, index)
    return hard_negative_captions(sample.caption, sample.attrs, n, rng)


def caption_vocabulary() -> list[str]:
    """Every word and punctuation mark a caption (of one or two shapes) can contain, sorted.

    For example to give a caption decoder a vocabulary of just these words.
    """
    texts = [
        *_SINGLE_TEMPLATES,
        *_PAIR_TEMPLATES,
        *_RELATION_TEMPLATES,
        *_RELATION_WORDS.values(),
        *SHAPES,
        *COLOURS,
        *SIZES,
        *_PHRASE.values(),
        "a an to the left of above",
    ]
    words: set[str] = set()
    for text in texts:
        words.update(re.sub(r"\{\w+\}", " ", text).replace(":", " : ").split())
    return sorted(words)


def _pick_combo(rng: np.random.Generator, pool: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    return pool[int(rng.integers(len(pool)))]


def make_shape_sample(
    index: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    antialias: bool = True,
    two_shape_share: float = TRAIN_TWO_SHAPE_SHARE,
    max_rotation: float = 0.0,
    relation_share: float = 0.0,
) -> ShapeSample:
    """Generate sample ``index`` of ``split``; the same arguments always give the same sample.

    Args:
        index: position in the split (any non-negative integer).
        split: ``"train"`` or ``"heldout"``.
        seed: data set seed.
        image_size: side of the square image in pixels (at least 16).
        antialias: draw at 4x resolution and box-filter down, for smooth edges.
        two_shape_share: probability that a training image shows two shapes (held-out images
            always show one).
        max_rotation: rotate shapes by up to this many degrees either way; 0 keeps them upright
            (the default: a small ViT learns upright shapes several times faster), 180 allows any angle.
        relation_share: probability that an image (training or held-out) is a relation scene: two shapes
            and a caption stating how they relate (see the module docstring).
    """
    split_id = check_split(split)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if not 0.0 <= two_shape_share <= 1.0:
        raise ValueError(f"two_shape_share must be in [0, 1], got {two_shape_share}")
    if not 0.0 <= relation_share <= 1.0:
        raise ValueError(f"relation_share must be in [0, 1], got {relation_share}")
    if not 0.0 <= max_rotation <= 180.0:
        raise ValueError(f"max_rotation must be in [0, 180] degrees, got {max_rotation}")
    rng = sample_rng("shapes", seed, split, index)
    size = image_size
    extra: dict[str, Any] = {}  # the attributes of relation scenes
    if split_id == 0 and rng.random() < two_shape_share:
        # Two small shapes, one per half; distinct colours and shapes so the caption is unambiguous.
        horizontal = bool(rng.random() < 0.5)
        first = _pick_combo(rng, SEEN_COMBOS)
        rest = tuple(c for c in SEEN_COMBOS if c[0] != first[0] and c[1] != first[1])
        combos = [first, _pick_combo(rng, rest)]
        halves = (
            [(0, 0, size / 2, size), (size / 2, 0, size, size)]
            if horizontal
            else [
                (0, 0, size, size / 2),
                (0, size / 2, size, size),
            ]
        )
        shapes = []
        for (shape, colour), box in zip(combos, halves):
            placed = _place(rng, size, box, "small")
            placed["position"] = ("left", "right")[len(shapes)] if horizontal else ("top", "bottom")[len(shapes)]
            shapes.append({"shape": shape, "colour": colour, "size": "small", **placed})
        caption = _pair_caption(rng, shapes[0], shapes[1], horizontal)
        mentions = ["shapes"]
    elif relation_share and rng.random() < relation_share:  # no draw at 0: other samples stay as they were
        shapes, caption, extra = _relation_scene(rng, size, split_id)
        mentions = ["relation"]
    else:
        unseen = split_id == 1 and index % HELDOUT_UNSEEN_EVERY == 0
        shape, colour = _pick_combo(rng, UNSEEN_COMBOS if unseen else SEEN_COMBOS)
        kind = SIZES[int(rng.integers(2))]
        shapes = [{"shape": shape, "colour": colour, "size": kind, **_place(rng, size, (0, 0, size, size), kind)}]
        caption, mentions = _single_caption(rng, shapes[0])
    for s in shapes:
        s["angle"] = float(rng.uniform(-max_rotation, max_rotation)) if s["shape"] in _ROTATES else 0.0
    # (num_shapes, H, W); drawn without the generator, so computing it first leaves the draws in order
    coverage = np.stack([_coverage(s["shape"], s["cx"], s["cy"], s["r"], s["angle"], size, antialias) for s in shapes])
    image = _render(rng, shapes, coverage, size)
    single = len(shapes) == 1
    attrs = {
        "shape": shapes[0]["shape"] if single else None,
        "colour": shapes[0]["colour"] if single else None,
        "size": shapes[0]["size"] if single else None,
        "position": shapes[0]["position"] if single else None,
        "num_shapes": len(shapes),
        "shapes": [
            {**{k: s[k] for k in ("shape", "colour", "size", "position")}, "box": _box(c)}
            for s, c in zip(shapes, coverage)
        ],
        "unseen": any((s["shape"], s["colour"]) in UNSEEN_COMBOS for s in shapes),
        "mentions": mentions,
        **extra,
    }
    return ShapeSample(image=image, caption=caption, attrs=attrs, coverage=coverage)


def _box(coverage: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(coverage > 0)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def shape_masks(sample: ShapeSample, threshold: float = 0.5, fill_holes: bool = False) -> np.ndarray:
    """Boolean masks ``(num_shapes, H, W)`` of a sample's shapes at the image's resolution, in the order of
    ``attrs["shapes"]``: the pixels each shape covers at least ``threshold`` of; with ``fill_holes`` also
    those it encloses (a ring's hole), so that each mask is the region inside the shape's outline.

    Two shapes of one image never overlap, so no pixel is in two masks.

    Raises:
        ValueError: ``sample`` was not made by ``make_shape_sample`` (it has no ``coverage``), or
            ``threshold`` is outside (0, 1].
    """
    if sample.coverage is None:
        raise ValueError("this ShapeSample has no coverage; masks come with samples from make_shape_sample")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a covered fraction in (0, 1], got {threshold}")
    masks = sample.coverage >= threshold
    return np.stack([_filled(m) for m in masks]) if fill_holes else masks


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every pixel that the outside cannot reach (4-connected) added."""
    outside = Image.fromarray(np.pad(mask, 1).astype(np.uint8) * 255, "L").copy()  # a copy PIL may write to
    ImageDraw.floodfill(outside, (0, 0), 128)  # the 1-pixel frame joins up all of the outside
    return np.asarray(outside)[1:-1, 1:-1] != 128


class ShapesDataset(Dataset):
    """Map-style dataset of ``n`` shape images generated on the fly (see ``make_shape_sample``).

    Items are ``{"image": transform(image) or the PIL image, "text": token ids (L,) if a tokenizer
    is given, "meta": {"caption": ..., **attrs}}``. Nothing is stored, so any number of DataLoader
    workers can share one instance, and item ``i`` is the same in every worker and epoch.

    Args:
        split: ``"train"`` or ``"heldout"``.
        n: number of samples.
        seed: data set seed.
        image_size: image side in pixels.
        transform: applied to the PIL image (e.g. ``polymodal.get_preprocess(name, "image")``).
        tokenizer: maps a list of strings to ``(B, L)`` token ids (e.g. ``CLIPTokenizer``).
        antialias: smooth shape edges.
        two_shape_share: share of two-shape images in ``"train"``.
        relation_share: share of relation scenes, in either split.
        max_rotation: largest rotation of a shape in degrees either way (0: upright).
        hard_negatives: give each item this many wrong captions close to its own
            (``hard_negative_captions``), tokenized as ``"text_negatives"`` ``(hard_negatives, L)``.
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
        two_shape_share: float = TRAIN_TWO_SHAPE_SHARE,
        max_rotation: float = 0.0,
        hard_negatives: int = 0,
        relation_share: float = 0.0,
    ) -> None:
        check_split(split)
        if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
            raise ValueError(f"hard_negatives must be a non-negative integer, got {hard_negatives!r}")
        if hard_negatives and tokenizer is None:
            raise ValueError("hard_negatives needs a tokenizer (they are given as token ids)")
        self.hard_negatives = hard_negatives
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.split, self.n, self.seed = split, n, seed
        self.options = {
            "image_size": image_size,
            "antialias": antialias,
            "two_shape_share": two_shape_share,
            "max_rotation": max_rotation,
            "relation_share": relation_share,
        }
        self.transform = transform
        self.tokenizer = tokenizer
        make_shape_sample(0, split, seed, **self.options)  # reject bad options now, not in a worker

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = dataset_index(index, self.n, type(self).__name__)
        sample = make_shape_sample(index, self.split, self.seed, **self.options)
        item: dict[str, Any] = {"image": self.transform(sample.image) if self.transform else sample.image}
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([sample.caption])[0]
        meta = {"caption": sample.caption, "index": index, **sample.attrs}
        if self.hard_negatives:
            negatives = sample_hard_negatives(sample, index, self.split, self.seed, self.hard_negatives)
            item["text_negatives"] = self.tokenizer(negatives)
            meta["hard_negatives"] = negatives
        item["meta"] = meta
        return item
