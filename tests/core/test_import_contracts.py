"""The layers of the package, checked on the source: every import (top-level, in functions, under
``TYPE_CHECKING``, relative) must point the way ARCHITECTURE.md says dependencies point."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# source folder -> the package it is installed as (pyproject's package-dir)
FOLDERS = {"polymodal": "polymodal", "encoders": "polymodal.encoders", "fusion": "polymodal.fusion"}
FOLDERS |= {"tasks": "polymodal.tasks", "datasets": "polymodal.datasets"}
# modules that import nothing of the project, so every layer may use them (media: the decoding both
# datasets and the encoders' preprocessing need)
LEAVES = ("polymodal.errors", "polymodal.fileio", "polymodal.media")
# what each layer may import from the project, besides itself and the leaves
ALLOWED = {
    "leaf": set(),
    "datasets": set(),
    "encoders": set(),
    "fusion": {"encoders"},
    "tasks": {"encoders", "fusion"},
    "core": {"datasets", "encoders", "fusion", "tasks", "core", "train"},
}
TRAINER_USERS = ("polymodal.train", "polymodal.commands", "polymodal.cli")


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    module: str  # the importing module, e.g. polymodal.tasks.index
    target: str  # the imported module, resolved, e.g. polymodal.fusion.loss
    names: tuple[str, ...]  # names taken from it by ``from target import ...``


def module_name(rel: Path) -> str:
    parts = [*FOLDERS[rel.parts[0]].split("."), *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def imports_of(path: Path) -> list[Import]:
    return imports_in(path.read_text(encoding="utf-8"), path.relative_to(ROOT))


def imports_in(source: str, rel: Path) -> list[Import]:
    """Every import in ``source``, the text of the file at ``rel`` (relative to the repository root)."""
    module = module_name(rel)
    package = module if rel.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=str(rel))):
        if isinstance(node, ast.Import):
            found += [Import(str(rel), node.lineno, module, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            # ``from polymodal import fileio`` imports the module polymodal.fileio, not the package
            modules = [n for n in names if _is_module(f"{target}.{n}")]
            found += [Import(str(rel), node.lineno, module, f"{target}.{n}", ()) for n in modules]
            rest = tuple(n for n in names if n not in modules)
            if rest:
                found.append(Import(str(rel), node.lineno, module, target, rest))
    return sorted(found, key=lambda i: (i.line, i.target))


def _is_module(name: str) -> bool:
    for folder, package in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if name == package or name.startswith(package + "."):
            base = ROOT / folder / Path(*name[len(package) :].lstrip(".").split("."))
            return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return False


def layer_of(module: str) -> str | None:
    """The layer of a project module, ``None`` for anything outside the project."""
    if module != "polymodal" and not module.startswith("polymodal."):
        return None
    if module in LEAVES or any(module.startswith(leaf + ".") for leaf in LEAVES):
        return "leaf"
    second = module.split(".")[1] if "." in module else ""
    if second in ("datasets", "encoders", "fusion", "tasks"):
        return second
    return "train" if second == "train" else "core"


def violations(found: list[Import]) -> list[str]:
    bad = []
    for imp in found:
        where = f"{imp.file}:{imp.line}"
        top = imp.target.split(".")[0]
        if top in ("encoders", "fusion", "tasks"):
            bad.append(f"{where}: imports {imp.target!r} as a bare top-level name; import it as polymodal.{imp.target}")
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private:
            bad.append(f"{where}: imports underscore names {private} from {imp.target}; make them public or move them")
        source, target = layer_of(imp.module), layer_of(imp.target)
        if target is None or target == "leaf" or target == source:
            continue
        if target not in ALLOWED["core" if source == "train" else source]:
            bad.append(f"{where}: {source} may not import {target} ({imp.target})")
        elif target == "train" and not imp.module.startswith(TRAINER_USERS):
            bad.append(f"{where}: only the trainer, the commands and the CLI import polymodal.train ({imp.target})")
    return bad


def test_the_checker_sees_every_kind_of_import():
    # the checker on known inputs, so that a broken parser cannot pass the real check vacuously
    source = (
        "import torch\n"
        "from polymodal import fileio\n"
        "def f():\n"
        "    from ..fusion import loss\n"
        "    from ...encoders.layers import Attention\n"
        "    from . import _private\n"
        "if TYPE_CHECKING:\n"
        "    from polymodal.train.loop import Trainer\n"
    )
    found = imports_in(source, Path("tasks/captioning/probe.py"))
    assert [(i.line, i.target, i.names) for i in found] == [
        (1, "torch", ()),
        (2, "polymodal.fileio", ()),
        (4, "polymodal.tasks.fusion", ("loss",)),  # two dots from tasks/captioning/ name polymodal.tasks
        (5, "polymodal.encoders.layers", ("Attention",)),
        (6, "polymodal.tasks.captioning", ("_private",)),
        (8, "polymodal.train.loop", ("Trainer",)),
    ]
    assert violations(found) == [
        "tasks/captioning/probe.py:6: imports underscore names ['_private'] from polymodal.tasks.captioning; "
        "make them public or move them",
        "tasks/captioning/probe.py:8: tasks may not import train (polymodal.train.loop)",
    ]
    sample = [
        Import("encoders/x.py", 3, "polymodal.encoders.x", "polymodal.tasks.zero_shot", ("ZeroShotClassifier",)),
        Import("fusion/y.py", 4, "polymodal.fusion.y", "polymodal.errors", ("ConfigError",)),
        Import("polymodal/factory.py", 6, "polymodal.factory", "polymodal.train.checkpoints", ()),
        Import("polymodal/cli.py", 7, "polymodal.cli", "polymodal.train.loop", ()),
        Import("datasets/w.py", 8, "polymodal.datasets.w", "polymodal.config", ()),
        Import("tasks/v.py", 9, "polymodal.tasks.v", "encoders", ()),
        Import("polymodal/errors.py", 10, "polymodal.errors", "polymodal.config", ()),
    ]
    assert violations(sample) == [
        "encoders/x.py:3: encoders may not import tasks (polymodal.tasks.zero_shot)",
        "polymodal/factory.py:6: only the trainer, the commands and the CLI import polymodal.train "
        "(polymodal.train.checkpoints)",
        "datasets/w.py:8: datasets may not import core (polymodal.config)",
        "tasks/v.py:9: imports 'encoders' as a bare top-level name; import it as polymodal.encoders",
        "polymodal/errors.py:10: leaf may not import core (polymodal.config)",
    ]


def test_layers_are_respected():
    bad = [v for path in source_files() for v in violations(imports_of(path))]
    assert not bad, "import contract violations (see ARCHITECTURE.md, 'Dependencies point one way'):\n" + "\n".join(bad)


LIGHT_IMPORT = """
import sys
import polymodal
polymodal.create_model("clip-vit-tiny")
print(sorted({m.split(".")[0] if m.startswith("matplotlib") else m for m in sys.modules}))
polymodal.get_model_config("coca-vit-tiny")  # validating the CoCa config
print(sorted({m.split(".")[0] if m.startswith("matplotlib") else m for m in sys.modules}))
polymodal.create_model("coca-vit-tiny")
print(sorted({m.split(".")[0] if m.startswith("matplotlib") else m for m in sys.modules}))
"""


def _loaded(stdout_line: str, prefixes: tuple[str, ...]) -> list[str]:
    modules = ast.literal_eval(stdout_line)
    return [m for m in modules if m == "matplotlib" or m.startswith(prefixes)]


@pytest.fixture(scope="module")
def light_import() -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def test_create_model_loads_neither_plots_nor_tasks_nor_trainer(light_import):
    after_clip, after_coca_config, _ = light_import
    assert _loaded(after_clip, ("polymodal.tasks", "polymodal.train")) == []
    assert _loaded(after_coca_config, ("polymodal.tasks", "polymodal.train")) == []


def test_building_a_captioner_loads_neither_plots_nor_trainer(light_import):
    # the caption decoder lives in polymodal.tasks.captioning, so building CoCa imports it; plotting
    # and the trainer stay out
    _, _, after_coca = light_import
    assert _loaded(after_coca, ("polymodal.train", "polymodal.tasks.plots", "polymodal.tasks.captioning.plots")) == []
