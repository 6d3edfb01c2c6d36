# mole: `make demo` (set-up included) and `make test` are the two commands a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MOLE := $(VENV)/bin/mole
export MOLE_HOME ?= $(CURDIR)/.mole
export DAGSTER_HOME ?= $(MOLE_HOME)/dagster
export MOLE_CONFIG_DIR ?= $(CURDIR)/config
UI_PORT ?= 3000

.PHONY: setup demo test lint ui bench clean

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
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/route.py

ui: setup
	mkdir -p $(DAGSTER_HOME) && touch $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

clean:
	rm -rf .mole data/experts
