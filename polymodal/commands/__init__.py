"""Task commands of the ``polymodal`` CLI, one module each.

Every public module here (no leading underscore) defines ``register(subparsers)``, which adds its
sub-command(s) with ``set_defaults(func=...)``; ``polymodal.cli.build_parser`` finds them all, so a
new command is one new file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

__all__ = ["register_all"]


def register_all(subparsers: argparse._SubParsersAction) -> None:
    """Add the sub-commands of every command module, in name order (stable ``--help`` output)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
