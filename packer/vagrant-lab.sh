#!/bin/bash
# `make vagrant-lab`: brings up the lab's balancer and one proxy node from
# out/agent-proxy.box with vagrant-libvirt under TCG, checks that they see each other on
# the lab network, reports the time, and tears everything down again.
# libvirtd runs in a network namespace of its own (its bridges, dnsmasq and iptables
# never touch the machine's network) and with /dev/kvm hidden (KVM hangs here; probing
# it costs minutes per VM). Environment: LAB_HOSTS (default: a balancer and a node from
# lab/topology.yaml), UP_TIMEOUT
# (seconds, default 900).
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
read -r -a LAB_HOSTS <<< "${LAB_HOSTS:-$default_hosts}"
UP_TIMEOUT=${UP_TIMEOUT:-900}
total_start=$SECONDS
step_start=$SECONDS
step() { echo "vagrant-lab: $1 in $((SECONDS - step_start)) s"; step_start=$SECONDS; }

[[ -f out/agent-proxy.box ]] || { echo "vagrant-lab: out/agent-proxy.box missing (make image)" >&2; exit 2; }
if ip netns list | grep -qw "$NS"; then
  echo "vagrant-lab: namespace $NS exists: a previous run is still up or was interrupted (ip netns delete $NS after checking)" >&2
  exit 2
fi
rm -rf "$W"
mkdir -p "$W/home"
export VAGRANT_HOME=$W/home VAGRANT_DEFAULT_PROVIDER=libvirt AGENT_PROXY_LIBVIRT_DRIVER=qemu
export VAGRANT_DOTFILE_PATH=$W/dotfile

# Vagrant itself runs in the namespace too: the VMs' management addresses exist only there
# (from the machine's own namespace they would route off the machine).
in_ns_vagrant() { ip netns exec "$NS" vagrant "$@"; }

teardown() {
  echo "vagrant-lab: tearing down"
  if [[ -d $W/dotfile ]]; then in_ns_vagrant destroy -f > "$W/destroy.log" 2>&1 || echo "vagrant-lab: vagrant destroy failed, see $W/destroy.log" >&2; fi
  for daemon in libvirtd virtlogd; do
    if [[ -f $W/$daemon.pid ]]; then
      pid=$(cat "$W/$daemon.pid")
      kill "$pid" 2>/dev/null && for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  ip netns delete "$NS"
}

ip netns add "$NS"
trap teardown EXIT
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" virtlogd --daemon --pid-file "$W/virtlogd.pid"
ip netns exec "$NS" unshare --mount --propagation private \
  sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd --daemon --pid-file "$1"' sh "$W/libvirtd.pid"
for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done
virsh -c qemu:///system version >/dev/null || { echo "vagrant-lab: libvirtd did not answer" >&2; exit 1; }
# A transient storage pool for the run (nothing left in libvirt's configuration).
if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
  mkdir -p "$W/pool"
  virsh -c qemu:///system pool-create-as default dir --target "$W/pool" >/dev/null
fi
step "libvirtd in namespace $NS"

vagrant box add --name agent-proxy --force out/agent-proxy.box > "$W/box.log" 2>&1
step "vagrant box add"

if ! timeout "$UP_TIMEOUT" ip netns exec "$NS" vagrant up --no-provision "${LAB_HOSTS[@]}" > "$W/up.log" 2>&1; then
  tail -n 30 "$W/up.log" >&2
  echo "vagrant-lab: vagrant up ${LAB_HOSTS[*]} failed or exceeded $UP_TIMEOUT s (log: $W/up.log)" >&2
  exit 1
fi
step "vagrant up --no-provision ${LAB_HOSTS[*]}"

# Every host reaches every other on its lab addresses (TCP to SSH, no ping in the image).
for host in "${LAB_HOSTS[@]}"; do
  for peer in "${LAB_HOSTS[@]}"; do
    [[ $host == "$peer" ]] && continue
    address=$(ruby -ryaml -e 'puts YAML.safe_load(File.read("lab/topology.yaml"))["hosts"].find { |h| h["name"] == ARGV[0] }["interfaces"][0]["address"]' "$peer")
    in_ns_vagrant ssh "$host" -c "timeout 5 bash -c '</dev/tcp/$address/22'" > /dev/null 2>&1 ||
      { echo "vagrant-lab: $host cannot reach $peer at $address:22" >&2; exit 1; }
    echo "vagrant-lab: $host reaches $peer at $address"
  done
done
step "lab network check"
echo "vagrant-lab: PASS; ${LAB_HOSTS[*]} up and connected in $((SECONDS - total_start)) s (teardown follows)"
