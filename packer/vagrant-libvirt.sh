#!/bin/bash
# Sourced by packer/vagrant-lab.sh and packer/vagrant-demo.sh: libvirtd and Vagrant for a
# lab of VMs from out/agent-proxy.box under TCG, confined to a network namespace of their
# own ($NS; its bridges, dnsmasq and iptables never touch the machine's network) with
# /dev/kvm hidden (KVM hangs here; probing it costs minutes per VM). The caller sets NS
# (namespace) and W (work directory), and calls libvirt_up after `trap libvirt_down EXIT`.
# Vagrant runs in the namespace too: the VMs' management addresses exist only there.

[[ -f out/agent-proxy.box ]] || { echo "$0: out/agent-proxy.box missing (make image)" >&2; exit 2; }
if ip netns list | grep -qw "$NS"; then
  echo "$0: namespace $NS exists: a previous run is still up or was interrupted (ip netns delete $NS after checking)" >&2
  exit 2
fi
rm -rf "$W"
mkdir -p "$W/home"
export VAGRANT_HOME=$W/home VAGRANT_DEFAULT_PROVIDER=libvirt LAB_LIBVIRT_DRIVER=qemu
export VAGRANT_DOTFILE_PATH=$W/dotfile

in_ns() { ip netns exec "$NS" "$@"; }

libvirt_up() {
  ip netns add "$NS"
  in_ns ip link set lo up
  in_ns virtlogd --daemon --pid-file "$W/virtlogd.pid"
  in_ns unshare --mount --propagation private \
    sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd --daemon --pid-file "$1"' sh "$W/libvirtd.pid"
  for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done
  virsh -c qemu:///system version >/dev/null || { echo "$0: libvirtd did not answer" >&2; exit 1; }
  # A transient storage pool for the run (nothing left in libvirt's configuration).
  if ! virsh -c qemu:///system pool-info default >/dev/null 2>&1; then
    mkdir -p "$W/pool"
    virsh -c qemu:///system pool-create-as default dir --target "$W/pool" >/dev/null
  fi
  vagrant box add --name agent-proxy --force out/agent-proxy.box > "$W/box.log" 2>&1
}

# Destroys the VMs Vagrant knows in this run (by name), stops libvirtd and virtlogd by
# their pid files, deletes the namespace.
libvirt_down() {
  if [[ -d $W/dotfile ]]; then
    in_ns vagrant destroy -f > "$W/destroy.log" 2>&1 || echo "$0: vagrant destroy failed, see $W/destroy.log" >&2
  fi
  for daemon in libvirtd virtlogd; do
    if [[ -f $W/$daemon.pid ]]; then
      pid=$(cat "$W/$daemon.pid")
      kill "$pid" 2>/dev/null && for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  if ip netns list | grep -qw "$NS"; then ip netns delete "$NS"; fi
}
