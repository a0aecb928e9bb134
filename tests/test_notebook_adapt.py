"""notebooks/05_adapt_and_explain.ipynb runs top to bottom (in a file of its own: see tests/test_notebooks.py)."""

import pytest

from tests.test_notebooks import NOTEBOOKS, OWN_FILE, execute_notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in OWN_FILE], ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    execute_notebook(path, tmp_path)
