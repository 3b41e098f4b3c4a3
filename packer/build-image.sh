#!/bin/bash
# `make image`: base disk -> Packer (the appliance playbook, twice) -> out/.
#   out/agent-proxy.qcow2        the appliance disk (compressed qcow2)
#   out/agent-proxy.box          the same disk as a libvirt Vagrant box
#   out/agent-proxy.inputs       the hash of the inputs it was built from (packer/inputs-hash.sh)
# An image built from the same inputs is kept: nothing is rebuilt unless an input changed
# or REBUILD=1. Environment: ACCELERATOR (default tcg), PACKER_TIMEOUT (seconds, default 1800).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=$REPO/out
BUILD=$OUT/build
ACCELERATOR=${ACCELERATOR:-tcg}
PACKER_TIMEOUT=${PACKER_TIMEOUT:-1800}
total_start=$SECONDS
step_start=$SECONDS
step() { echo "image: $1 in $((SECONDS - step_start)) s"; step_start=$SECONDS; }

HTTP_PID= DEB_PID=
cleanup() {
  local pid
  for pid in $HTTP_PID $DEB_PID; do kill "$pid" 2>/dev/null && { wait "$pid" 2>/dev/null || [[ $? == 143 ]]; }; done
}
trap cleanup EXIT

inputs=$(packer/inputs-hash.sh)
if [[ ${REBUILD:-0} != 1 && -f $OUT/agent-proxy.qcow2 && -f $OUT/agent-proxy.box && -f $OUT/agent-proxy.inputs \
      && $(cat "$OUT/agent-proxy.inputs") == "$inputs" ]]; then
  echo "image: out/agent-proxy.qcow2 and .box are up to date (inputs $inputs); REBUILD=1 builds them again"
  exit 0
fi
rm -rf "$BUILD"
mkdir -p "$BUILD/www" "$BUILD/ssh"

# The package the role installs in the image (out/agent-proxy_VERSION_amd64.deb), built
# beside the base disk: the two share nothing, and mmdebstrap often waits on the mirror.
deb/build.sh > "$BUILD/deb.log" 2>&1 &
DEB_PID=$!
base_disk=$(packer/base-disk.sh | tail -1)
step "base disk"
if ! wait "$DEB_PID"; then
  DEB_PID=
  cat "$BUILD/deb.log" >&2
  echo "image: building the package failed (above; $BUILD/deb.log)" >&2
  exit 1
fi
DEB_PID=
cat "$BUILD/deb.log"
step "package (built beside the base disk)"

# The build's local apt repository, on loopback only; the guest sees it at 10.0.2.2.
ln -s "$OUT/cache/apt" "$BUILD/www/apt"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$BUILD/www" "$port" > "$BUILD/http.log" 2>&1 &
HTTP_PID=$!
for _ in $(seq 50); do
  if curl -sf -o /dev/null "http://127.0.0.1:$port/apt/Packages"; then break; fi
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$port/apt/Packages" || { echo "image: the local repository did not come up on 127.0.0.1:$port" >&2; exit 1; }

# A key pair for this build only; its public half is removed from the image at the end.
ssh-keygen -q -t ed25519 -N '' -C "agent-proxy-build" -f "$BUILD/ssh/id_ed25519"

echo "image: packer build (accelerator $ACCELERATOR; log $BUILD/packer.log, console $BUILD/packer-serial.log)"
if ! PACKER_LOG=1 PACKER_LOG_PATH="$BUILD/packer.log" PACKER_CACHE_DIR="$OUT/cache/packer" timeout "$PACKER_TIMEOUT" \
    packer build -force -color=false \
    -var "base_disk=file://$base_disk" \
    -var "accelerator=$ACCELERATOR" \
    -var "ssh_private_key_file=$BUILD/ssh/id_ed25519" \
    -var "ssh_public_key_file=$BUILD/ssh/id_ed25519.pub" \
    -var "repo_url=http://10.0.2.2:$port/" \
    -var "output_directory=$BUILD/packer" \
    -var "serial_log=$BUILD/packer-serial.log" \
    packer/; then
  echo "image: packer build failed or exceeded ${PACKER_TIMEOUT} s; last console lines:" >&2
  tail -n 20 "$BUILD/packer-serial.log" >&2
  exit 1
fi
step "packer build"

mv "$BUILD/packer/agent-proxy.qcow2" "$OUT/agent-proxy.qcow2"
mkdir -p "$BUILD/box"
virtual_gb=$(qemu-img info --output=json "$OUT/agent-proxy.qcow2" | python3 -c 'import json, sys; print(-(-json.load(sys.stdin)["virtual-size"] // 2**30))')
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$virtual_gb" > "$BUILD/box/metadata.json"
cp packer/box-Vagrantfile "$BUILD/box/Vagrantfile"
ln "$OUT/agent-proxy.qcow2" "$BUILD/box/box.img"
tar -C "$BUILD/box" -cf "$OUT/agent-proxy.box.tmp" metadata.json Vagrantfile box.img
mv "$OUT/agent-proxy.box.tmp" "$OUT/agent-proxy.box"
rm -rf "$BUILD/box"
echo "$inputs" > "$OUT/agent-proxy.inputs"
step "box"
echo "image: out/agent-proxy.qcow2 $(du -m "$OUT/agent-proxy.qcow2" | cut -f1) MB, out/agent-proxy.box $(du -m "$OUT/agent-proxy.box" | cut -f1) MB; $((SECONDS - total_start)) s in all"
