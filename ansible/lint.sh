#!/usr/bin/env bash
# Static checks of ansible/: ansible-lint (production profile), a syntax check of every
# playbook, and defaults vs. meta/argument_specs.yml of every role. Installs the pinned
# ansible-core and ansible-lint (ansible/requirements.txt; with mitogen, which the image
# build and the two-node VM test run their playbooks under) into the project .venv first.
# Whether the roles work and are idempotent is proven on a real host: the image build
# runs playbooks/appliance.yml twice and fails if the second run changes anything.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
venv="$root/.venv"
stamp="$venv/.ansible-installed"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "lint.sh: $venv is missing; run 'make venv' first" >&2
    exit 1
fi
if [[ ! -f "$stamp" || "$here/requirements.txt" -nt "$stamp" ]]; then
    echo "lint.sh: installing ansible-core and ansible-lint into $venv"
    timeout 300 "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" \
        || { echo "lint.sh: pip install -r ansible/requirements.txt failed or took over 300 s" >&2; exit 1; }
    touch "$stamp"
fi

export PATH="$venv/bin:$PATH"
export ANSIBLE_CONFIG="$here/ansible.cfg"
export ANSIBLE_HOME="$root/build/ansible-home"  # galaxy caches stay out of ~ and the tree
export ANSIBLE_LOCAL_TEMP="$ANSIBLE_HOME/tmp"
export ANSIBLE_NOCOLOR=1
mkdir -p "$ANSIBLE_LOCAL_TEMP"
cd "$here"

echo "== argument specs"
python check_argument_specs.py roles

echo "== syntax check"
for playbook in playbooks/*.yml; do
    timeout 60 ansible-playbook --syntax-check -i inventories/example/hosts.yml "$playbook" \
        || { echo "lint.sh: syntax check of $playbook failed (or took over 60 s)" >&2; exit 1; }
done

echo "== ansible-lint --profile production"
timeout 180 ansible-lint --nocolor --profile production -c .ansible-lint --project-dir "$here" playbooks roles inventories \
    || { echo "lint.sh: ansible-lint found problems (or took over 180 s)" >&2; exit 1; }
echo "lint.sh: ok"
