"""Prompt templates for zero-shot classification: sentences with one ``{}`` for the class name.

A zero-shot classifier embeds every class name through each template and averages the
embeddings, so a class is described by many phrasings instead of one; varied wording (style,
quality, size, medium) makes the average less sensitive to how any one sentence is worded.
The sets here were written for this project. A template may also be a callable that maps a
class name to a sentence, for phrasings a single ``{}`` cannot express.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

Template = str | Callable[[str], str]

SIMPLE_IMAGE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a snapshot of a {}.",
)

IMAGE_ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    # Plain photographs.
    "a photo of a {}.",
    "a photo of the {}.",
    "a photograph of a {}.",
    "an image of a {}.",
    "a picture of the {}.",
    "a snapshot of the {}.",
    "a color photo of a {}.",
    "a black and white photo of a {}.",
    "a photo showing one {}.",
    "a photo of several {}.",
    "a photo of my {}.",
    "a photo of someone's {}.",
    # Image quality and framing.
    "a blurry photo of the {}.",
    "a grainy photo of a {}.",
    "a low resolution photo of a {}.",
    "a pixelated image of the {}.",
    "a dark photo of a {}.",
    "an overexposed photo of the {}.",
    "a badly framed photo of a {}.",
    "a sharp, detailed photo of a {}.",
    "a high quality photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of the {}.",
    "a zoomed out photo of a {}.",
    "a photo of a {} seen from far away.",
    "a photo of a {} taken from above.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a photo of a {} in the background.",
    "a partly hidden {} in a photo.",
    # Settings and states.
    "a photo of a {} outdoors.",
    "a photo of a {} indoors.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a photo of an old {}.",
    "a photo of a brand new {}.",
    "a photo of a broken {}.",
    "a photo of an unusual {}.",
    "a photo of a typical {}.",
    # Other media.
    "a drawing of a {}.",
    "a pencil sketch of the {}.",
    "a painting of a {}.",
    "an oil painting of the {}.",
    "a watercolor of a {}.",
    "a cartoon {}.",
    "a comic book picture of a {}.",
    "a doodle of a {}.",
    "a tattoo of a {}.",
    "an embroidered {}.",
    "a sculpture of a {}.",
    "a plastic toy {}.",
    "a plush toy {}.",
    "a 3d render of the {}.",
    "a video game version of a {}.",
    "an origami {}.",
    "graffiti of a {}.",
    "a {} printed on a t-shirt.",
    "a rendition of the {}.",
    "art showing a {}.",
    "an icon of a {}.",
    "a sticker of a {}.",
    # Bare phrasings.
    "a {}.",
    "the {}.",
    "this is a {}.",
    "there is a {} in the picture.",
    "an example of a {}.",
)

AUDIO_TEMPLATES: tuple[str, ...] = (
    "the sound of a {}.",
    "a recording of {}.",
    "a sound clip of a {}.",
    "an audio recording of the {}.",
    "you can hear a {}.",
    "the noise a {} makes.",
    "a field recording of a {}.",
    "a short clip with the sound of {}.",
    "a distant {} can be heard.",
    "a loud {} sound.",
    "a quiet {} sound.",
    "a muffled recording of a {}.",
    "{} sounds.",
    "this is the sound of {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple_image": SIMPLE_IMAGE_TEMPLATES,
    "image_ensemble": IMAGE_ENSEMBLE_TEMPLATES,
    "audio": AUDIO_TEMPLATES,
}


def check_template(template: Template) -> None:
    """Raise ``ValueError`` unless ``template`` is a callable or a string with exactly one ``{}``.

    Literal braces are written doubled (``{{`` and ``}}``) as in ``str.format``; named or
    numbered fields (``{name}``, ``{0}``) and format specs (``{:>5}``) are refused because the
    class name is the only value ever substituted.
    """
    if callable(template):
        return
    if not isinstance(template, str):
        raise ValueError(f"a template must be a string with one '{{}}' or a callable, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"template {template!r} is not a valid format string ({e}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    fields = [(f, conv, spec) for _, f, spec, conv in parsed if f is not None]
    if len(fields) != 1 or fields[0] != ("", None, ""):
        shown = ["{" + f + (f"!{c}" if c else "") + (f":{s}" if s else "") + "}" for f, c, s in fields]
        raise ValueError(
            f"template {template!r} must contain exactly one '{{}}' for the class name, "
            f"got {len(fields)} field(s) {shown}"
        )


def check_templates(templates: Sequence[Template]) -> tuple[Template, ...]:
    """Validate every template (see ``check_template``) and return them as a tuple.

    Raises:
        ValueError: ``templates`` is a bare string, empty, or holds an invalid template.
    """
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise ValueError(f"templates must be a list of templates, got {type(templates).__name__}: {templates!r}")
    if not templates:
        raise ValueError("templates is empty; give at least one template such as 'a photo of a {}.'")
    for i, t in enumerate(templates):
        try:
            check_template(t)
        except ValueError as e:
            raise ValueError(f"templates[{i}]: {e}") from None
    return tuple(templates)


def fill_template(template: Template, class_name: str) -> str:
    """The sentence ``template`` makes for ``class_name``."""
    text = template(class_name) if callable(template) else template.format(class_name)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"template {template!r} made {text!r} for class {class_name!r}; expected a non-empty string")
    return text


def get_templates(name: str) -> tuple[str, ...]:
    """A built-in template set by name: one of ``TEMPLATE_SETS``."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; expected one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


for _templates in TEMPLATE_SETS.values():
    check_templates(_templates)
