# avsr-pipeline: `make demo` (install, start the local stack, run a real job, print it, stop)
# and `make test`. Everything installs into .venv; torch goes in first so pip never pulls CUDA.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
TORCH ?= torch==2.13.0

.PHONY: install demo test test-unit test-integration lint up down status bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	@command -v redis-server >/dev/null || (command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq redis-server) || \
		echo "note: redis-server not installed; a Redis must answer at AVSR_REDIS_URL")
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || (command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || \
		echo "note: chromium not installed; the web page's browser test is skipped (fails with CI=true)")
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m deploy.local.demo

test: install lint
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

up: install
	$(PY) -m deploy.local.stack up

down:
	$(PY) -m deploy.local.stack down

status:
	$(PY) -m deploy.local.stack status

bench: install
	$(PY) -m bench.bench_model
	$(PY) -m bench.bench_roi
	$(PY) -m bench.bench_service
	$(PY) -m bench.bench_batching

clean:
	rm -rf var .pytest_cache .ruff_cache
