# K2: the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: run test lint install system-deps bench clean-state help

help:
	@echo "make run    start Kafka and the Dagster UI on http://127.0.0.1:3000 (Ctrl-C stops all)"
	@echo "make test   create the environment if needed and run the whole test suite"
	@echo "make bench  run the benchmarks; JSON lands in bench-results/"
	@echo "make lint   ruff (lint and format check) and mypy, also run by make test"

# The environment: uv installs exactly what uv.lock pins into .venv.
$(VENV)/.installed: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || [ -x "$(UV)" ] || python3 -m pip install --user --quiet uv \
		|| python3 -m pip install --user --quiet --break-system-packages uv
	$(UV) sync --frozen --extra dev
	@touch $@

install: system-deps $(VENV)/.installed

# Java, Maven (and, for the tests, Chromium, Prometheus, Alertmanager) from Debian's packages
# when missing; a no-op on a machine that has them.
system-deps:
	@bash infra/scripts/system-deps.sh $(if $(filter test bench,$(MAKECMDGOALS)),--test)

run: install
	$(VENV)/bin/k2 run

# Lint and types first (seconds), then the suite: `make test` is what CI runs.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/pytest

# The judge (tests/benchmarks/targets.toml) runs even when a benchmark failed; either failing fails
# make bench. Result files older than this run count as not run.
bench: install
	@mkdir -p bench-results
	@started=$$(date +%s); \
	$(VENV)/bin/pytest tests/benchmarks -p no:cacheprovider -o testpaths=tests/benchmarks -o python_files="bench_*.py" -q; \
	benched=$$?; \
	$(PY) -m tests.support.bench_judge --since $$started; \
	judged=$$?; \
	[ $$benched -eq 0 ] && [ $$judged -eq 0 ]

clean-state:
	rm -rf .k2
