#!/bin/bash
# Prints a hash of everything the appliance image is built from: the image's own files,
# the application and its templates, the roles and playbooks (not the checks, tests and
# docs around them, nor the Vagrant lab's scripts and playbook). packer/build-image.sh
# stores it next to the image and builds again only when it no longer matches.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
find packer appliance ansible app haproxy firewall deb -type f \
    ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -name '*.pyc' ! -name '*.md' \
    ! -path packer/check.sh ! -path packer/test-image.sh ! -path packer/test-multinode.sh ! -path packer/test-vms.sh \
    ! -path packer/test-helpers.sh ! -path 'packer/vagrant-*.sh' \
    ! -path ansible/playbooks/lab.yml ! -path 'ansible/playbooks/tasks/lab-*' -print0 |
  LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
