# The two commands of the README:
#   make demo   the main job on the embedded default (local etcd, OpenBao, sshd nodes)
#   make test   every check: ruff, mypy and the whole pytest suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all setup system-deps lint format typecheck test test-unit test-e2e demo \
        bench-rivers bench-sabakan bench-cke bench-scale bench-backup clean

all: test

# System packages the suite needs on a fresh Debian machine (run as root).
system-deps:
	@missing=""; \
	command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v unshare >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v nsenter >/dev/null 2>&1 || missing="$$missing util-linux"; \
	command -v ssh-keygen >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	$(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv python3-pip"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: system-deps $(STAMP)

lint: setup
	$(VENV)/bin/ruff check cke sabakan rivers tests
	$(VENV)/bin/ruff format --check cke sabakan rivers tests

format: setup
	$(VENV)/bin/ruff check --fix cke sabakan rivers tests
	$(VENV)/bin/ruff format cke sabakan rivers tests

typecheck: setup
	$(VENV)/bin/mypy

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m cke.devenv

bench-rivers: setup
	@command -v haproxy >/dev/null 2>&1 && command -v iperf3 >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy iperf3)
	$(PY) -m rivers.bench

bench-sabakan: setup
	$(PY) -m sabakan.bench

bench-cke: setup
	$(PY) -m cke.bench

bench-scale: setup
	$(PY) -m cke.benchscale

bench-backup: setup
	$(PY) -m cke.benchbackup

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
