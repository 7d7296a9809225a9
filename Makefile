# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Install stamps carry pyproject.toml's checksum, so an edit to it re-installs. `make run`
# needs the runtime only; `make test` adds the dev extras (pytest, ruff, torch, Playwright…).
SUM       := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.installed-run-$(SUM)
DEV_STAMP := $(VENV)/.installed-dev-$(SUM)

.PHONY: run demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	rm -f $(VENV)/.installed-run-* && touch $(RUN_STAMP)

# The dev extras include the runtime, so this stamp stands for both.
$(DEV_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(RUN_STAMP) $(DEV_STAMP)

# The service with embedded defaults: SQLite and checkpoints under ./var, Ray on this machine.
run: $(RUN_STAMP)
	$(VENV)/bin/shardgrad serve --data-dir var

# The engine alone (no Ray), then one distributed job from the command line.
demo: $(RUN_STAMP)
	$(PY) examples/core_demo.py
	$(VENV)/bin/shardgrad train examples/moons.json --out var/runs/moons

test: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/core_step.py
	$(PY) benchmarks/sync_step.py
	$(PY) benchmarks/vs_raytrain.py
	$(PY) benchmarks/examples.py
	$(PY) benchmarks/first_step.py

clean:
	rm -rf $(VENV) var runs .pytest_cache
