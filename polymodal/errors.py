"""The exceptions polymodal raises about a user's input.

A leaf of the package: it imports nothing from polymodal, so every layer (``datasets``, ``encoders``,
``fusion``, ``tasks`` and the core) may raise these. The command line prints any ``PolymodalError`` as one
line and exits with status 2; Python callers catch them by type.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError", "PolymodalError"]


class PolymodalError(Exception):
    """Base of every error polymodal raises about what it was given (never about a bug of its own)."""


class InputError(PolymodalError, ValueError):
    """A user's file, value or argument is unusable; the message names it and says what was expected."""


class ConfigError(InputError):
    """A model or training config (a YAML/JSON file or a dict) holds a value of the wrong kind or range."""
