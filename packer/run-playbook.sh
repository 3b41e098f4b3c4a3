#!/bin/bash
# Runs the appliance playbook against the Packer build VM (called by build.pkr.hcl's
# shell-local provisioners). `first` provisions; `second` runs the same playbook again
# and fails if it changed anything: the roles must be idempotent.
# Usage: run-playbook.sh first|second   (PLAYBOOK_HOST, _PORT, _USER, _KEY, _ADMIN_NETWORKS set)
set -euo pipefail

RUN=$1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PLAYBOOK=${PLAYBOOK:-$REPO/ansible/playbooks/appliance.yml}
ANSIBLE_PLAYBOOK=$REPO/.venv/bin/ansible-playbook
BUILD=$REPO/out/build
[[ -x $ANSIBLE_PLAYBOOK ]] || { echo "run-playbook: $ANSIBLE_PLAYBOOK missing (ansible/lint.sh installs ansible-core into .venv)" >&2; exit 2; }
[[ -f $PLAYBOOK ]] || { echo "run-playbook: $PLAYBOOK missing" >&2; exit 2; }

cat > "$BUILD/inventory.ini" <<INI
[appliance]
agent-proxy ansible_host=$PLAYBOOK_HOST ansible_port=$PLAYBOOK_PORT ansible_user=$PLAYBOOK_USER ansible_ssh_private_key_file=$PLAYBOOK_KEY ansible_python_interpreter=/usr/bin/python3
INI

export ANSIBLE_HOST_KEY_CHECKING=False ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_RETRY_FILES_ENABLED=False
export ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=120s -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no"
export ANSIBLE_PIPELINING=True
# Facts gathered by the first run serve the second (each module costs seconds under TCG).
export ANSIBLE_GATHERING=smart ANSIBLE_CACHE_PLUGIN=jsonfile ANSIBLE_CACHE_PLUGIN_CONNECTION=$BUILD/facts
# Both runs under Mitogen's strategy (packer/mitogen.sh; ANSIBLE_MITOGEN=0: Ansible's own).
# shellcheck source=packer/mitogen.sh
source "$REPO/packer/mitogen.sh"
use_mitogen "$REPO/.venv" || exit 2
LOG=$BUILD/playbook-$RUN.log
start=$SECONDS
# The image installs the application from the package `make deb` built and Debian packages only.
# stdin is a /dev/null of its own: ansible-playbook refuses a non-blocking one, and one
# shared with other processes can be left so (test-multinode.sh, playbook()).
"$ANSIBLE_PLAYBOOK" -i "$BUILD/inventory.ini" "$PLAYBOOK" \
  -e "agent_proxy_package_dir=$REPO/out" \
  -e "{\"firewall_admin_networks\": $(python3 -c 'import json, sys; print(json.dumps(sys.argv[1].split(",")))' "$PLAYBOOK_ADMIN_NETWORKS")}" \
  < /dev/null 2>&1 | tee "$LOG"
if ! recap=$(sed -n '/^PLAY RECAP/,$p' "$LOG" | grep -E 'ok='); then
  echo "run-playbook: no PLAY RECAP in $LOG" >&2
  exit 1
fi
echo "run-playbook: $RUN run in $((SECONDS - start)) s: $recap"
if [[ $RUN == second ]] && grep -qE 'changed=[1-9]' <<< "$recap"; then
  echo "run-playbook: the second run changed something; the roles are not idempotent (see $LOG)" >&2
  exit 1
fi
