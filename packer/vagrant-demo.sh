#!/bin/bash
# `make vagrant-demo`: the lab's scenario on VMs. Brings up the hosts of lab/topology.yaml
# (LAB_HOSTS, default all) from out/agent-proxy.box with vagrant-libvirt under TCG
# (packer/vagrant-libvirt.sh), provisions them with ansible/playbooks/lab.yml, runs the
# same scenario steps as `make demo` against them over SSH and prints the same step report
# (python -m lab.vagrant), then destroys every VM by name and stops libvirtd. The VMs reach
# nothing outside the lab: their apt reads the image build's local repository
# (out/cache/apt), served on the namespace's loopback-free management network only.
# Environment: LAB_HOSTS (space-separated host names); the work directory is out/vagrant-demo.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
W=$REPO/out/vagrant-demo
NS=ap-vagrant-demo
export LAB_HOSTS=${LAB_HOSTS:-}
APT_PORT=8808
HTTP_PID=

[[ -f out/cache/apt/Packages ]] || { echo "vagrant-demo: out/cache/apt missing (make image builds it)" >&2; exit 2; }
[[ -x .venv/bin/ansible-playbook ]] || { echo "vagrant-demo: .venv/bin/ansible-playbook missing (ansible/lint.sh installs it)" >&2; exit 2; }

# shellcheck source=packer/vagrant-libvirt.sh
source packer/vagrant-libvirt.sh
teardown() {
  if [[ -n $HTTP_PID ]]; then kill "$HTTP_PID"; wait "$HTTP_PID" 2>/dev/null || [[ $? == 143 ]]; fi
  libvirt_down
}
trap teardown EXIT
libvirt_up

# The agent_proxy and balancer_pair roles install the package (agent_proxy_package_dir's default, out/).
deb/build.sh > "$W/deb.log" 2>&1 || { cat "$W/deb.log" >&2; echo "vagrant-demo: deb/build.sh failed" >&2; exit 1; }

# The apt repository, inside the namespace only (its addresses are the libvirt networks').
ip netns exec "$NS" python3 -m http.server --bind 0.0.0.0 --directory out/cache/apt "$APT_PORT" > "$W/apt-http.log" 2>&1 &
HTTP_PID=$!
# vagrant-libvirt's management network: the VMs see the namespace at 192.168.121.1.
export LAB_APT_REPOSITORY=http://192.168.121.1:$APT_PORT/

export PATH=$REPO/.venv/bin:$PATH
# One SSH session per task instead of three or four (each costs seconds on a TCG VM).
export ANSIBLE_PIPELINING=True
in_ns .venv/bin/python -m lab.vagrant --workdir "$W" --hosts "$LAB_HOSTS"
