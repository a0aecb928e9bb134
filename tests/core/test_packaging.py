"""The distribution installs exactly one top-level package, ``polymodal``, with its subpackages mapped."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def source_files() -> dict[str, Path]:
    """Each module and data file the wheel must hold, by its path inside the wheel."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = {}
    for package, folder in setup["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".json", ".typed") and "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT / folder)
                files[str(Path(*package.split("."), rel))] = path
    return files


def test_every_package_in_the_tree_is_listed():
    """A folder of modules missing from ``packages`` would be left out of the wheel (editable installs hide it)."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    in_tree = {str(Path(name).parent).replace(os.sep, ".") for name in source_files()}
    assert in_tree == set(setup["packages"]), in_tree ^ set(setup["packages"])


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
    missing = sorted(set(source_files()) - set(names))
    assert not missing, missing

    # installed on its own (no checkout on the path), every command is there and the registry has its configs
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import polymodal, polymodal.train, polymodal.commands, polymodal.tasks.captioning\n"
        f"assert polymodal.__file__.startswith({str(target)!r}), polymodal.__file__\n"
        "from polymodal.registry import list_models\n"
        "assert 'clip-vit-tiny' in list_models() and 'coca-vit-tiny' in list_models()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    help_text = subprocess.run(
        [sys.executable, "-m", "polymodal", "--help"], check=True, cwd=tmp_path, env=env, capture_output=True, text=True
    ).stdout
    for command in ("train", "evaluate", "zeroshot", "index", "search", "caption", "finetune", "data", "convert"):
        assert command in help_text, command


def test_encoders_import_without_training_code():
    """A user who imports only an encoder pulls in none of the core, fusion or training modules (only the
    leaf modules every layer may use)."""
    code = (
        "import sys, polymodal.encoders\n"
        "leaves = ('polymodal.errors', 'polymodal.fileio', 'polymodal.media')\n"
        "loaded = [m for m in sys.modules if m.startswith('polymodal.')\n"
        "          and not m.startswith('polymodal.encoders') and m not in leaves]\n"
        "heavy = [m for m in ('transformers', 'timm', 'open_clip') if m in sys.modules]\n"
        "print(loaded, heavy)\n"
        "assert not loaded and not heavy, (loaded, heavy)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
