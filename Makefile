# The two front-door commands (run as root on a fresh machine):
#   make demo   -- the main job: `hotrelay demo`
#   make test   -- every test, privileged ones included
# Both create .venv and install what they need on first use.

SHELL := /bin/bash
# Debian's interpreter, not a per-user one under /root: processes inside user-namespaced
# test containers (uid 100000 on the host) must be able to execute it.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV ?= .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	scripts/ensure-system-deps base
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/hotrelay demo

test: $(STAMP)
	scripts/ensure-system-deps test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
