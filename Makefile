# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when pyproject.toml changes (the stamp carries its checksum).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The service with embedded defaults: SQLite and checkpoints under ./var, Ray on this machine.
run: $(STAMP)
	$(VENV)/bin/shardgrad serve --data-dir var

# The engine alone (no Ray), then one distributed job from the command line.
demo: $(STAMP)
	$(PY) examples/core_demo.py
	$(VENV)/bin/shardgrad train examples/moons.json --out var/runs/moons

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/core_step.py
	$(PY) benchmarks/sync_step.py
	$(PY) benchmarks/vs_raytrain.py

clean:
	rm -rf $(VENV) var runs .pytest_cache
