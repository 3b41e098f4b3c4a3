#!/bin/bash
# The offline base disk: a Debian bookworm root filesystem (bookworm, -updates, -security)
# made with mmdebstrap, put on an MBR disk with one ext4 partition and extlinux, and
# converted to a compressed qcow2. Alongside it, a local apt repository holding every
# package the image's Ansible roles install (packer/guest-packages), so that the Packer
# build needs no network but the host's loopback.
#
# No password and no SSH key is baked in. Keys reach the guest at boot through a seed
# (appliance/firstboot/agent-proxy-seed: QEMU fw_cfg, a volume labelled APSEED, or
# /boot/agent-proxy-seed/), which is also how operators inject theirs.
#
# The first-boot setup (agent-proxy-firstboot) and the motd come with the package, which the
# Packer build installs, so that changing them does not rebuild this disk.
#
# Output (cached, keyed by a hash of every input; a rerun with the same inputs is instant):
#   out/cache/base-<hash>.qcow2   the disk
#   out/cache/apt-<hash>/         the local apt repository (Packages + .debs)
# and the symlinks out/cache/base.qcow2, out/cache/apt pointing at them.
# Usage: packer/base-disk.sh            (prints the disk's path on its last line)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE="$REPO/out/cache"
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DISK_SIZE_MB=3072
BUILD_USER=admin

# What the disk is made of; the image's roles add the application on top. python3-apt:
# Ansible's apt module needs it on the target (ansible/README.md). Without it, the module
# installs it itself (an apt-get update and install: tens of seconds of the build's first
# run under TCG), and under Mitogen's strategy it cannot, and the task fails.
BASE_PACKAGES=(
  linux-image-amd64 systemd systemd-sysv udev dbus kmod
  openssh-server sudo python3 python3-apt ca-certificates chrony
  haproxy iptables iproute2 netbase less
)
GUEST_PACKAGES=$(sed -e 's/#.*//' "$REPO/packer/guest-packages" | xargs)

inputs_hash() {
  {
    cat "$REPO/packer/base-disk.sh" "$REPO/packer/customize-rootfs.sh" "$REPO/packer/guest-packages" \
      "$REPO"/appliance/firstboot/{agent-proxy-seed,agent-proxy-seed.service,ssh-host-keys.service}
    echo "$MIRROR $SECURITY_MIRROR"
  } | sha256sum | cut -c1-16
}

HASH=$(inputs_hash)
DISK="$CACHE/base-$HASH.qcow2"
APT_REPO="$CACHE/apt-$HASH"
if [[ -f "$DISK" && -f "$APT_REPO/Packages" ]]; then
  echo "base disk: cached ($DISK)" >&2
  ln -sfn "$(basename "$DISK")" "$CACHE/base.qcow2"
  ln -sfn "$(basename "$APT_REPO")" "$CACHE/apt"
  echo "$DISK"
  exit 0
fi

for tool in mmdebstrap sfdisk mkfs.ext4 extlinux qemu-img dpkg-scanpackages; do
  command -v "$tool" >/dev/null || { echo "base-disk: $tool not found (make deps installs it)" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "base-disk: needs root (mmdebstrap --mode=root, mount -o loop)" >&2; exit 2; }

WORK=$(mktemp -d "$CACHE/.work-XXXXXX" 2>/dev/null || { mkdir -p "$CACHE"; mktemp -d "$CACHE/.work-XXXXXX"; })
MNT="$WORK/mnt"
LOOP=
cleanup() {
  if mountpoint -q "$MNT"; then umount "$MNT"; fi
  if [[ -n $LOOP ]]; then losetup --detach "$LOOP"; fi
  # Never remove a tree that still has something mounted in it (an interrupted mmdebstrap).
  if findmnt --list --noheadings --output TARGET | grep -q "^$WORK/"; then
    echo "base disk: mounts left under $WORK; not removing it" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS" "$MNT" "$WORK/apt/partial"

step_start=$SECONDS
echo "base disk: mmdebstrap bookworm into $ROOTFS" >&2
# The download-only hook runs the host's apt with mmdebstrap's configuration: apt inside
# the chroot cannot resolve names (no resolv.conf there).
mmdebstrap --mode=root --variant=apt --quiet \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
  --customize-hook="APT_CONFIG=\$MMDEBSTRAP_APT_CONFIG apt-get install --download-only --yes -qq \
      -o Dir::Cache::archives=$WORK/apt/ $GUEST_PACKAGES" \
  --customize-hook="$REPO/packer/customize-rootfs.sh \"\$1\" $BUILD_USER" \
  bookworm "$ROOTFS" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY_MIRROR bookworm-security main"
echo "base disk: root filesystem $(du -sm "$ROOTFS" | cut -f1) MB in $((SECONDS - step_start)) s" >&2

step_start=$SECONDS
mkdir -p "$APT_REPO.tmp"
find "$WORK/apt" -maxdepth 1 -name '*.deb' -exec mv -t "$APT_REPO.tmp" {} +
(cd "$APT_REPO.tmp" && dpkg-scanpackages -m . /dev/null > Packages 2>/dev/null)
echo "base disk: local apt repository with $(grep -c '^Package:' "$APT_REPO.tmp/Packages") packages" >&2

RAW="$WORK/disk.raw"
OFFSET=$((2048 * 512))
mkdir -p "$ROOTFS/boot/extlinux"
cat > "$ROOTFS/boot/extlinux/extlinux.conf" <<'EOF'
# /vmlinuz and /initrd.img are the links Debian's kernel packages keep current.
default debian
timeout 1
label debian
  kernel /vmlinuz
  initrd /initrd.img
  append root=LABEL=root ro console=tty0 console=ttyS0,115200 net.ifnames=0
EOF
truncate -s "${DISK_SIZE_MB}M" "$RAW"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk --quiet "$RAW"
mkfs.ext4 -q -L root -O ^64bit,^metadata_csum,^orphan_file -E offset=$OFFSET \
  -d "$ROOTFS" "$RAW" $(( (DISK_SIZE_MB * 1024) - (OFFSET / 1024) ))k
# An explicit loop device, detached before the image is read: with an auto-cleared loop,
# umount can return before the last blocks reach the file (a corrupt disk under load).
LOOP=$(losetup --find --show --offset $OFFSET "$RAW")
mount "$LOOP" "$MNT"
extlinux --install "$MNT/boot/extlinux" 2>/dev/null
umount "$MNT"
losetup --detach "$LOOP"
LOOP=
sync "$RAW"
if ! e2fsck -fn "$RAW?offset=$OFFSET" > "$WORK/fsck.log" 2>&1; then
  cat "$WORK/fsck.log" >&2
  echo "base disk: the new file system does not check clean" >&2
  exit 1
fi
dd if=/usr/lib/EXTLINUX/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none
qemu-img convert -c -O qcow2 "$RAW" "$DISK.tmp"
mv "$DISK.tmp" "$DISK"
rm -rf "$APT_REPO"
mv "$APT_REPO.tmp" "$APT_REPO"
ln -sfn "$(basename "$DISK")" "$CACHE/base.qcow2"
ln -sfn "$(basename "$APT_REPO")" "$CACHE/apt"
echo "base disk: $(du -m "$DISK" | cut -f1) MB qcow2 in $((SECONDS - step_start)) s" >&2
echo "$DISK"
