# Sourced by the scripts that run playbooks on TCG guests: the image build's two runs
# (packer/run-playbook.sh; the second must change nothing) and packer/test-multinode.sh.
#
# Under TCG every module Ansible runs costs the guest seconds: a new Python that unpacks the
# module and compiles Ansible's module_utils from a zip each time (a ping, on an idle guest:
# 2.0-2.8 s, against 1.2-1.3 s with the same files compiled once). Mitogen for Ansible (the
# mitogen package, ansible/requirements.txt) keeps one Python per guest and user for the
# whole run and runs the same modules in it: the appliance playbook's run that changes
# nothing took 52 s instead of 174 s on one guest, the build's first run 90 s instead of
# 197-249 s. The roles and modules are the same. Ansible's own strategy, the one operators
# run, is what ANSIBLE_MITOGEN=0 gives all of these; the host's role tests
# (tests/integration/test_role_key_material.py) and `make vagrant-demo` always use it.

# use_mitogen VENV: the ansible-playbook runs that follow use Mitogen's linear strategy
# from VENV, unless ANSIBLE_MITOGEN=0; says so and fails when VENV has no mitogen.
# Mitogen starts its Python on a guest (over SSH, then sudo) within ANSIBLE_TIMEOUT: the
# default 10 s was too short for a TCG guest beside the host's tests ("UNREACHABLE!
# Connection timed out." on the first task, seen once in make test), so it is at least 120 s
# here. A timeout, not a check.
use_mitogen() {
  [[ ${ANSIBLE_MITOGEN:-1} == 0 ]] && return 0
  local package
  package=$("$1/bin/python" -c 'import ansible_mitogen, os; print(os.path.dirname(ansible_mitogen.__file__))' 2> /dev/null) || {
    echo "use_mitogen: no mitogen in $1: run ansible/lint.sh, which installs it (ANSIBLE_MITOGEN=0 runs without)" >&2
    return 1
  }
  export ANSIBLE_STRATEGY_PLUGINS=$package/plugins/strategy ANSIBLE_STRATEGY=mitogen_linear
  ((${ANSIBLE_TIMEOUT:-10} >= 120)) || export ANSIBLE_TIMEOUT=120
}
