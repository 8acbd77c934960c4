# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: a plain `torch` requirement with nothing installed pulls a multi-GB CUDA build.
# On a GPU machine, override it, e.g. `make TORCH_SPEC='torch==2.13.0' test` with your index.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint format docs bench studio clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gpu-agent demo

test: install
	$(PY) -m pytest

# ruff (lint and format), strict mypy on every package, the tests, the benchmarks and the
# examples, and the layers of
# ../shared/ARCHITECTURE.md ([tool.importlinter] in pyproject.toml); CI runs it before the tests.
# `make format` rewrites what `ruff format --check` refuses.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests benchmarks examples  # apart: benchmarks/council.py is no package
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: a broken link, a page
# missing from the nav or a bad anchor fails the build (CI runs it).
docs: install
	$(VENV)/bin/mkdocs build --strict

# The LangGraph dev server on 127.0.0.1:2024 (offline; Studio itself is a hosted web page).
studio: install
	$(VENV)/bin/gpu-agent studio

bench: install
	$(PY) benchmarks/graph_latency.py

clean:
	rm -rf $(VENV) .gpu-agent .pytest_cache build *.egg-info
