"""The distribution installs exactly one top-level package, ``polymodal``, with its subpackages mapped."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_has_one_top_level_package(tmp_path):
    # build from a copy so the checkout gets no build/ or egg-info leftovers
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "runs",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("polymodal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"polymodal"}, top
    for sub in ("encoders", "fusion", "tasks", "datasets"):
        assert f"polymodal/{sub}/__init__.py" in names
    assert "polymodal/py.typed" in names
    assert "polymodal/model_configs/clip-vit-b-32.json" in names
    assert not any(n.startswith("polymodal/tests") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "polymodal = polymodal.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_encoders_import_without_training_code():
    """A user who imports only an encoder pulls in none of the core, fusion or training modules."""
    code = (
        "import sys, polymodal.encoders\n"
        "loaded = [m for m in sys.modules if m.startswith('polymodal.') and not m.startswith('polymodal.encoders')]\n"
        "heavy = [m for m in ('transformers', 'timm', 'open_clip') if m in sys.modules]\n"
        "print(loaded, heavy)\n"
        "assert not loaded and not heavy, (loaded, heavy)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
