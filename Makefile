# mole: `make demo` (set-up included) and `make test` are the two commands a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MOLE := $(VENV)/bin/mole
export MOLE_HOME ?= $(CURDIR)/.mole
export DAGSTER_HOME ?= $(MOLE_HOME)/dagster
export MOLE_CONFIG_DIR ?= $(CURDIR)/config
UI_PORT ?= 3000

.PHONY: setup demo test lint ui ui-check tensorboard bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(MOLE) demo-data --out data/experts --per-expert 100 --seed 0
	time $(MOLE) materialize demo
	$(MOLE) deploy demo
	$(MOLE) report demo
	@echo
	@echo "Open the Dagster UI:  make ui   then browse http://127.0.0.1:$(UI_PORT)"

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check modal_jobs mole_assets tests scripts benchmarks
	$(VENV)/bin/mypy

# CPU benchmarks (need `make demo` first); `datasets` is only for preprocess.py's baseline.
bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/route.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py

ui: setup
	$(PY) -m mole_assets.instance
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

# Real webserver + headless Chromium screenshot of the lineage (needs `apt-get install chromium`).
ui-check: setup
	$(PY) -m pip install -q -e ".[dev,ui]"
	$(PY) scripts/ui_check.py

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(MOLE_HOME)/volumes/moe-lora-data/runs --host 127.0.0.1

clean:
	rm -rf .mole data/experts
