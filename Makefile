# Two commands on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest-xdist workers for make test: one per core of the 2-core reference machine, longest test files first
# (tests/conftest.py LONGEST_FIRST; --no-loadscope-reorder keeps that order). tests/conftest.py gives
# each worker, and what it starts, its share of the threads)
TEST_WORKERS ?= 2

.PHONY: install demo demo-audio test test-fast lint format bench clean

install: $(STAMP)

# Re-installs only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The main job: train clip-vit-tiny on the built-in shapes data, print held-out zero-shot accuracy and
# retrieval recall; report.json, metrics.jsonl and PNG plots land in runs/demo/.
demo: install
	$(PY) -m polymodal train configs/demo.yaml resume=latest $(ARGS)

demo-audio: install
	$(PY) -m polymodal train configs/demo-audio.yaml resume=latest $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/encoders.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
