#!/bin/bash
# mmdebstrap customize hook for packer/base-disk.sh: turns a bare bookworm root filesystem
# into the appliance's base. Runs on the host with the root filesystem's path as $1.
# Usage: customize-rootfs.sh ROOTFS BUILD_USER
set -euo pipefail

ROOT=$1
BUILD_USER=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
in_root() { chroot "$ROOT" "$@"; }

echo agent-proxy > "$ROOT/etc/hostname"
cat > "$ROOT/etc/hosts" <<'EOF'
127.0.0.1 localhost
127.0.1.1 agent-proxy
::1 localhost ip6-localhost ip6-loopback
EOF
echo 'LABEL=root / ext4 errors=remount-ro 0 1' > "$ROOT/etc/fstab"

# Network: DHCP on the first interface only; Vagrant and operators add the others
# (systemd-networkd files sorting after 10-).
cat > "$ROOT/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=yes
EOF
in_root systemctl enable --quiet systemd-networkd.service

# The operator account: key-only SSH, sudo without password, no password at all ("*"),
# and the journal readable without sudo.
in_root useradd --create-home --shell /bin/bash --groups sudo,systemd-journal "$BUILD_USER"
in_root usermod --password '*' "$BUILD_USER"
echo "$BUILD_USER ALL=(ALL) NOPASSWD:ALL" > "$ROOT/etc/sudoers.d/90-$BUILD_USER"
chmod 0440 "$ROOT/etc/sudoers.d/90-$BUILD_USER"
in_root install -d -m 0700 -o "$BUILD_USER" -g "$BUILD_USER" "/home/$BUILD_USER/.ssh"
cat > "$ROOT/etc/ssh/sshd_config.d/10-appliance.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
# Ed25519 and ECDSA only: an RSA host key costs ~15 s of first boot under emulation.
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
EOF

# Host keys are made on each machine's first boot, never shared between copies.
rm -f "$ROOT"/etc/ssh/ssh_host_*
install -m 0644 "$REPO/appliance/firstboot/ssh-host-keys.service" "$ROOT/etc/systemd/system/"
in_root systemctl enable --quiet ssh-host-keys.service

# The boot seed (SSH keys, first-boot settings); see appliance/firstboot/agent-proxy-seed.
install -m 0755 "$REPO/appliance/firstboot/agent-proxy-seed" "$ROOT/usr/local/sbin/"
install -m 0644 "$REPO/appliance/firstboot/agent-proxy-seed.service" "$ROOT/etc/systemd/system/"
in_root systemctl enable --quiet agent-proxy-seed.service
install -d -m 0755 "$ROOT/boot/agent-proxy-seed"

# No resolver is configured (the appliance talks to addresses); drop the dangling stub.
rm -f "$ROOT/etc/resolv.conf"
touch "$ROOT/etc/resolv.conf"

# Every copy gets its own machine id on first boot.
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log "$ROOT"/var/cache/debconf/*-old
