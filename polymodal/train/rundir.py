"""Which folders a run may write into, and the clean-up of what a killed run left behind.

A run writes only into an empty (or new) folder, into its own earlier run, or, with
``overwrite=true``, into any folder. A run recognises its own earlier run by the marker file
``.polymodal-run`` it writes first (runs written before the marker existed are recognised by their
complete checkpoints), so a folder holding a user's own ``config.yaml`` or ``curves.png`` is never
written over by accident.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from polymodal.errors import InputError
from polymodal.fileio import atomic_write_text, stale_temporaries

from .checkpoints import COMPLETE, complete_checkpoints

__all__ = ["MARKER", "check_run_dir", "claim_run_dir", "is_run_dir", "remove_incomplete_checkpoints"]

MARKER = ".polymodal-run"
# What shows that a folder holds results (not just a run that was started): resuming or replacing them is a choice.
RESULTS = ("metrics.jsonl", "checkpoints", "report.json", "model")


def is_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a polymodal run (its marker, or complete checkpoints of an older run)."""
    return (run_dir / MARKER).is_file() or bool(complete_checkpoints(run_dir))


def remove_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete what killed saves left: temporary folders and checkpoint folders without the ``COMPLETE`` marker."""
    root = run_dir / "checkpoints"
    removed = [*stale_temporaries(run_dir), *stale_temporaries(root)]
    if root.is_dir():
        removed += [p for p in root.glob("step_*") if p.is_dir() and not (p / COMPLETE).is_file()]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def check_run_dir(run_dir: Path, *, resuming: bool, resume_asked: bool, overwrite: bool) -> None:
    """Refuse, with an ``InputError`` saying why and what to do, a ``run_dir`` this run may not write into;
    changes nothing on disk. The arguments are those of ``claim_run_dir``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run_dir {str(run_dir)!r} is a file; expected a folder for the run's outputs")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    own = is_run_dir(run_dir)
    if entries and not own and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise InputError(
            f"run_dir {str(run_dir)!r} holds files that are not from a polymodal run ({shown}); a run writes only "
            "into an empty folder or its own earlier run: choose another run_dir, or pass overwrite=true to write "
            "over them"
        )
    results = [n for n in RESULTS if (run_dir / n).exists()]
    if own and results and not (resuming or overwrite or resume_asked):
        raise InputError(
            f"run_dir {str(run_dir)!r} already holds a run ({', '.join(results)}); pass resume=latest to "
            "continue it, overwrite=true to replace it, or choose another run_dir"
        )


def claim_run_dir(
    run_dir: Path, outputs: Iterable[str], *, resuming: bool, resume_asked: bool, overwrite: bool
) -> None:
    """Make ``run_dir`` this run's folder (``check_run_dir`` first), cleaning up what it replaces.

    Args:
        run_dir: the run's folder (created when missing).
        outputs: every file or folder name the run writes there; a fresh start deletes these.
        resuming: a complete checkpoint will be loaded, so the outputs are continued, not deleted.
        resume_asked: ``resume`` was set; with no complete checkpoint to load (a run killed before or
            during its first save) the run's own folder starts afresh.
        overwrite: write into any folder, replacing an earlier run's outputs.
    """
    check_run_dir(run_dir, resuming=resuming, resume_asked=resume_asked, overwrite=overwrite)
    remove_incomplete_checkpoints(run_dir)
    if not resuming:
        for name in {*outputs, MARKER}:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        atomic_write_text(run_dir / MARKER, json.dumps({"written_by": "polymodal"}) + "\n", overwrite=True)
