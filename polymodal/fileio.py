"""Atomic writes of files and directories: the one home for how polymodal puts anything on disk.

A leaf of the package (standard library only), so every layer may use it. Readers never see half a
file or half a directory, an existing output is never replaced unless the caller asks, and what is
written gets the permissions of a plain ``open`` / ``mkdir`` under the current umask (``mkstemp`` and
``mkdtemp`` create owner-only entries, which others sharing an output folder could not read).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "OutputExistsError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "stale_temporaries",
]


class OutputExistsError(FileExistsError):
    """An output that is already there and was not asked to be replaced.

    The message says how to ask, in the caller's terms: ``str()`` names the Python argument
    (``overwrite=True``), ``cli_message()`` the command-line flag (``--overwrite``), which is what
    ``polymodal.cli`` prints.
    """

    def __init__(self, path: str | os.PathLike, state: str = "already exists") -> None:
        self.path, self.state = Path(path), state
        super().__init__(self._message("overwrite=True"))

    def _message(self, how: str) -> str:
        return f"{str(self.path)!r} {self.state}; pass {how} to replace it"

    def cli_message(self) -> str:
        return self._message("--overwrite")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_permissions(root: Path) -> None:
    mask = _umask()
    for path in (root, *root.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise OutputExistsError(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path``.

    Without ``overwrite`` an existing file is refused, also one created while the block ran (the
    temporary file is hard-linked into place, which, unlike a rename, never replaces a file).
    """
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                _refuse_existing(path)
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], overwrite: bool = False
) -> Path:
    """Write ``data`` (bytes, or a function that writes into an open binary file) to ``path`` atomically."""
    with atomic_file(path, overwrite=overwrite) as tmp, open(tmp, "xb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``destination`` only if the block succeeds.

    An existing destination is never overwritten unless ``overwrite=True``; even then the old
    contents stay in place until the new ones are complete. Temporary folders are named
    ``.NAME.tmp-*`` beside the destination, so a process killed mid-write leaves only such a folder,
    which ``stale_temporaries`` finds for cleaning.
    """
    destination = Path(destination)
    if not overwrite:
        _refuse_existing(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield tmp
        _umask_permissions(tmp)
        if destination.exists():
            if not overwrite:
                _refuse_existing(destination)
            backup = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            backup.rmdir()
            destination.rename(backup)
            tmp.rename(destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Temporary entries that a killed ``atomic_file`` / ``atomic_directory`` left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))
