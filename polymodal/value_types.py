"""Checking config values against the type annotations of the constructors and dataclasses they feed.

A config is JSON or YAML, so a wrong value (``"width": "wide"``, ``"depth": 2.5``) would otherwise
reach torch and fail deep inside ``nn.Conv2d`` with a message about tensors. The annotations are read
as written (strings, under ``from __future__ import annotations``) and parsed with ``ast`` rather than
evaluated: a name imported only for type checking (``PretrainedConfig``) must not make checking fail,
and a type this module does not know is accepted rather than guessed at.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

from polymodal.errors import ConfigError

__all__ = ["annotation_of", "check_value"]

_SCALARS: dict[str, Callable[[Any], bool]] = {
    # bool is an int in Python, but ``"layers": true`` is a mistake, not the number 1
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "PathLike": lambda v: isinstance(v, str) or hasattr(v, "__fspath__"),
    "Any": lambda v: True,
}
_SEQUENCES = {"tuple", "list", "Sequence", "Tuple", "List"}
_MAPPINGS = {"dict", "Mapping", "Dict", "MutableMapping"}


def annotation_of(parameter: inspect.Parameter) -> str | None:
    """The annotation of a parameter as source text, or ``None`` when it has none."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return None
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def check_value(value: Any, annotation: str, where: str, known: dict[str, type] | None = None) -> None:
    """Raise ``ConfigError`` naming ``where`` when ``value`` does not fit ``annotation``.

    Args:
        value: the config value.
        annotation: the annotation as source text, e.g. ``"int | tuple[int, int]"``.
        where: the config field, for the message (``"towers.image.width"``).
        known: dataclasses a value may be given as (an instance or a mapping of its fields).
    """
    try:
        node = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return  # not an expression we can read (a forward reference string): accept
    if _fits(value, node, known or {}) is False:
        raise ConfigError(f"{where} must be {annotation}, got {value!r} ({type(value).__name__})")


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr  # os.PathLike, typing.Optional, nn.Module: the last part says what it is
    return None


def _fits(value: Any, node: ast.expr, known: dict[str, type]) -> bool | None:
    """``True`` / ``False`` when the annotation decides, ``None`` when it names a type we do not know."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _any_fits(value, [node.left, node.right], known)
    if isinstance(node, ast.Constant):
        if node.value is None:
            return value is None
        return _fits(value, ast.parse(node.value, mode="eval").body, known) if isinstance(node.value, str) else None
    if isinstance(node, ast.Subscript):
        return _fits_subscript(value, _name(node.value), node.slice, known)
    name = _name(node)
    if name in ("None", "NoneType"):
        return value is None
    if name in _SCALARS:
        return _SCALARS[name](value)
    if name in _SEQUENCES:
        return isinstance(value, (list, tuple))
    if name in _MAPPINGS:
        return isinstance(value, dict)
    if name == "Callable":
        return callable(value)
    if name in known:
        return isinstance(value, (known[name], dict))
    return None


def _any_fits(value: Any, options: list[ast.expr], known: dict[str, type]) -> bool | None:
    results = [_fits(value, option, known) for option in options]
    if any(r is True for r in results):
        return True
    return None if any(r is None for r in results) else False


def _fits_subscript(value: Any, name: str | None, index: ast.expr, known: dict[str, type]) -> bool | None:
    args = list(index.elts) if isinstance(index, ast.Tuple) else [index]
    if name == "Optional":
        return True if value is None else _fits(value, args[0], known)
    if name == "Union":
        return _any_fits(value, args, known)
    if name == "Literal":
        return any(isinstance(a, ast.Constant) and a.value == value and type(a.value) is type(value) for a in args)
    if name == "Callable":
        return callable(value)
    if name in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        variadic = name not in ("tuple", "Tuple") or (len(args) == 2 and _is_ellipsis(args[1]))
        if variadic:
            return _all_fit(value, [args[0]] * len(value), known)
        return len(value) == len(args) and _all_fit(value, args, known)
    if name in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        key, item = (args + [None, None])[:2]
        pairs = [(k, key) for k in value] + [(v, item) for v in value.values()]
        return _all_fit([p[0] for p in pairs], [p[1] for p in pairs], known)
    return None


def _all_fit(values: Any, nodes: list[ast.expr | None], known: dict[str, type]) -> bool | None:
    results = [_fits(v, n, known) if n is not None else None for v, n in zip(values, nodes)]
    if any(r is False for r in results):
        return False
    return True if all(r is True for r in results) else None


def _is_ellipsis(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis
