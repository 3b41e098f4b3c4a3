# agent-proxy: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP  := $(VENV)/.installed

.PHONY: help deps venv test test-fast demo lab-up lab-down bench compliance image clean

help:
	@echo "make demo        bring up the namespace lab, run the whole path, print a report, tear down"
	@echo "make test        install what the tests need (apt, pip into .venv) and run them"
	@echo "make test-fast   unit and integration tests only, nothing installed"
	@echo "make lab-up      build the lab and leave it running;  make lab-down  tears it down"
	@echo "make bench       throughput and latency side by side (about 10 minutes)"
	@echo "make compliance HOSTS=ssh://node   audit a node"
	@echo "make image       build the appliance qcow2 and Vagrant box into out/"

# Debian packages, from tools/apt-packages (comments and blank lines ignored).
deps:
	@pkgs=$$(sed -e 's/#.*//' tools/apt-packages | xargs); \
	if dpkg-query -W -f='$${Status}\n' $$pkgs 2>/dev/null | grep -qv '^install ok installed$$' \
	   || [ $$(dpkg-query -W $$pkgs 2>/dev/null | wc -l) -ne $$(echo $$pkgs | wc -w) ]; then \
		echo "installing: $$pkgs"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	fi

venv: $(STAMP)
$(STAMP): app/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e 'app[test]'
	touch $@

test: deps venv
	$(PYTEST) tests/unit tests/integration

test-fast: venv
	$(PYTEST) -q tests/unit tests/integration

clean:
	rm -rf $(VENV) out build
