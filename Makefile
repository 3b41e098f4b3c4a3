# agent-proxy: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP  := $(VENV)/.installed

.PHONY: help deps venv lock deb apt-repo test test-host test-fast test-image test-multinode demo lab-up lab-down bench compliance image vagrant-lab vagrant-demo clean

help:
	@echo "make demo        bring up the namespace lab, run the whole path, print a report, tear down"
	@echo "make test        install what the tests need (apt, pip into .venv) and run them"
	@echo "make test-fast   unit and integration tests only, nothing installed"
	@echo "make test-image  the image built, booted and audited alone (part of make test)"
	@echo "make test-multinode  two booted nodes made one proxy by the site playbook, alone (part of make test)"
	@echo "make lab-up      build the lab and leave it running;  make lab-down  tears it down"
	@echo "make bench       throughput and latency side by side (about 10 minutes)"
	@echo "make compliance HOSTS=ssh://node   audit a node"
	@echo "make deb         build the Debian package out/agent-proxy_VERSION_amd64.deb (and its .buildinfo)"
	@echo "make apt-repo    the package in a signed flat apt repository, out/apt-repo/"
	@echo "make lock        refresh app/requirements.lock, the package's pinned dependencies"
	@echo "make image       build the appliance qcow2 and Vagrant box into out/"
	@echo "make vagrant-lab vagrant up the balancer and one node from the box (slow under TCG)"
	@echo "make vagrant-demo  the demo's scenario on VMs (LAB_HOSTS=... for a part; see lab/README.md)"

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

# The whole suite, in two runs side by side (tools/side-by-side; on two cores each leaves
# CPU idle that the other uses):
#   host  unit, integration (real waitress, HAProxy, nginx, curl on loopback), the
#         namespace lab, compliance against a lab node, the Ansible/Packer/Vagrant checks,
#         a smoke run of the benchmark harness (`bench --smoke`: every path briefly and
#         the scale measurements at a small size);
#   vms   packer/test-vms.sh: the VM image built, then booted under TCG and audited
#         (test-image.sh) beside two booted nodes made one proxy by site.yml
#         (test-multinode.sh). SKIP_IMAGE=1 (local runs only): the template checks alone.
# ansible/lint.sh goes first: it installs ansible-core, which the host's
# tests/integration/test_role_key_material.py and the VM tests run. (Plain `make`, not
# $(MAKE), in the side-by-side line: make runs a line naming $(MAKE) even under `make -n`.)
test: deps venv
	ansible/lint.sh
ifeq ($(SKIP_IMAGE),1)
	$(MAKE) --no-print-directory test-host
	packer/check.sh
else
	tools/side-by-side host 'make --no-print-directory test-host' vms packer/test-vms.sh
endif

test-host: venv
	$(PYTEST) tests/unit tests/integration tests/lab tests/compliance/test_lab_node.py
	$(PY) -m bench --smoke

# Either VM test alone (both run in `make test`). The image is built first when its
# inputs changed; ansible/lint.sh installs the ansible-playbook they run.
test-image: deps venv image
	packer/test-image.sh

test-multinode: deps venv image
	ansible/lint.sh
	packer/test-multinode.sh

test-fast: venv
	$(PYTEST) -q tests/unit tests/integration

demo: deps venv
	$(PY) -m lab demo

lab-up: deps venv
	$(PY) -m lab up

lab-down: venv
	$(PY) -m lab down

bench: deps venv
	$(VENV)/bin/pip install -q -e 'app[bench]'
	$(PY) -m bench

HOSTS ?= local://
# COMPLIANCE_ARGS: more options, e.g. "--sudo --ssh-config=FILE" or "--ap-config=PATH".
compliance: venv
	$(PYTEST) tests/compliance --hosts='$(HOSTS)' $(COMPLIANCE_ARGS) --junitxml=out/compliance.xml

# The Python dependencies the package installs, pinned with hashes (tools/lock.sh):
# the newest releases app/pyproject.toml allows; LOCK_UPGRADE="cryptography" moves only those.
lock: venv
	$(VENV)/bin/pip install -q -e 'app[lock]'
	tools/lock.sh

# The one artifact: out/agent-proxy_VERSION_amd64.deb, checked by lintian (deb/build.sh).
deb: deps venv
	deb/build.sh

# out/apt-repo/: a flat apt repository with that package, signed with its own key (deb/apt-repo.sh).
apt-repo: deb
	deb/apt-repo.sh

# The build runs the appliance playbook with .venv's ansible-playbook, which ansible/lint.sh
# installs (with the lint) when it is missing: `make image` on a fresh clone.
image: deps venv
	test -x $(VENV)/bin/ansible-playbook || ansible/lint.sh
	packer/build-image.sh

vagrant-lab: image
	packer/vagrant-lab.sh

# ansible/lint.sh installs the ansible-playbook that `vagrant provision` runs.
vagrant-demo: image
	ansible/lint.sh
	packer/vagrant-demo.sh

clean:
	rm -rf $(VENV) out build
