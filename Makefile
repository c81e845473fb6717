# Two commands: `make run` and `make test`. Everything else is a helper.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run test lint typecheck bench browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned, alone: otherwise a dependency may pull a CUDA build.
$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PIP) install -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime-installed
	$(BIN)/python manage.py run

# Browser tests drive Debian's chromium; install it when we may (root, apt).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: browser tests will be skipped"; }

test: $(VENV)/.dev-installed browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(VENV)/.dev-installed
	@echo "see bench/README.md for the benchmark scripts"

clean:
	rm -rf var/test .pytest_cache .mypy_cache .ruff_cache
