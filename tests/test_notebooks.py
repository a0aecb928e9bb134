"""Every notebook in notebooks/ runs top to bottom (so none can rot), and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_tour_is_complete():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "01_train_and_zero_shot.ipynb",
        "02_retrieval.ipynb",
        "03_captioning.ipynb",
        "04_audio.ipynb",
        "05_adapt_and_explain.ipynb",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} was saved with outputs"


def execute_notebook(path, tmp_path) -> None:
    """Run ``path`` top to bottom from an empty folder; it must raise nothing and show a plot."""
    nb = nbformat.read(path, as_version=4)
    # Run from an empty folder beside nothing: the notebooks must not depend on runs/ from `make demo`.
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no plot"


# make test hands out whole files to its two workers; the longest notebook runs from a file of its own
# (tests/test_notebook_adapt.py) so that the two workers share the notebooks' time.
OWN_FILE = {"05_adapt_and_explain"}


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in OWN_FILE], ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    execute_notebook(path, tmp_path)
