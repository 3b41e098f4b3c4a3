#!/bin/bash
# `make vagrant-lab`: brings up the lab's balancer and one proxy node from
# out/agent-proxy.box with vagrant-libvirt under TCG (packer/vagrant-libvirt.sh), checks
# that they see each other on the lab network, reports the time, and tears everything
# down again. Environment: LAB_HOSTS (default: a balancer and a node from
# lab/topology.yaml), UP_TIMEOUT (seconds, default 900).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
W=$REPO/out/vagrant-lab
NS=ap-vagrant-lab
# Default: the first balancer of the first site that has one, and that site's first node.
default_hosts=$(ruby -ryaml -e '
  site = YAML.safe_load(File.read("lab/topology.yaml"))["sites"].find { |s| !s["balancers"].to_a.empty? } or
    abort("vagrant-lab: lab/topology.yaml has no site with a balancer")
  puts [site["balancers"].first, site["nodes"].first].join(" ")')
export LAB_HOSTS=${LAB_HOSTS:-$default_hosts}   # the Vagrantfile defines only these
read -r -a hosts <<< "$LAB_HOSTS"
UP_TIMEOUT=${UP_TIMEOUT:-900}
total_start=$SECONDS
step_start=$SECONDS
step() { echo "vagrant-lab: $1 in $((SECONDS - step_start)) s"; step_start=$SECONDS; }

# shellcheck source=packer/vagrant-libvirt.sh
source packer/vagrant-libvirt.sh
trap 'echo "vagrant-lab: tearing down"; libvirt_down' EXIT
libvirt_up
step "libvirtd in namespace $NS, vagrant box add"

if ! timeout "$UP_TIMEOUT" ip netns exec "$NS" vagrant up --no-provision "${hosts[@]}" > "$W/up.log" 2>&1; then
  tail -n 30 "$W/up.log" >&2
  echo "vagrant-lab: vagrant up ${hosts[*]} failed or exceeded $UP_TIMEOUT s (log: $W/up.log)" >&2
  exit 1
fi
step "vagrant up --no-provision ${hosts[*]}"

# Every host reaches every other on its lab addresses (TCP to SSH, no ping in the image).
for host in "${hosts[@]}"; do
  for peer in "${hosts[@]}"; do
    [[ $host == "$peer" ]] && continue
    address=$(ruby -ryaml -e 'puts YAML.safe_load(File.read("lab/topology.yaml"))["hosts"].find { |h| h["name"] == ARGV[0] }["interfaces"][0]["address"]' "$peer")
    in_ns vagrant ssh "$host" -c "timeout 5 bash -c '</dev/tcp/$address/22'" > /dev/null 2>&1 ||
      { echo "vagrant-lab: $host cannot reach $peer at $address:22" >&2; exit 1; }
    echo "vagrant-lab: $host reaches $peer at $address"
  done
done
step "lab network check"
echo "vagrant-lab: PASS; ${hosts[*]} up and connected in $((SECONDS - total_start)) s (teardown follows)"
