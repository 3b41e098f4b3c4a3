#!/bin/bash
# The image test in `make test`: the template checks, the image (rebuilt only when an
# input changed, see packer/inputs-hash.sh), one boot under QEMU TCG with user networking
# (SSH and :2002 forwarded to 127.0.0.1 only), the compliance suite over SSH, and one
# request relayed through the appliance's :2002 to an origin on the host's loopback
# (the guest reaches it as 10.0.2.2). The VM is stopped by PID.
# Environment: BOOT_TIMEOUT (seconds until SSH answers, default 300).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=$REPO/out
T=$OUT/test-image
BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}
total_start=$SECONDS
TEST_NAME=test-image
# shellcheck source=packer/test-helpers.sh
source packer/test-helpers.sh

QEMU_PID= ORIGIN_PID=
cleanup() {
  if [[ -S $T/ssh-appliance ]] && ! ssh -F "$T/ssh_config" -O exit appliance 2>/dev/null; then
    echo "test-image: could not close the SSH control connection $T/ssh-appliance" >&2
  fi
  if [[ -n $QEMU_PID ]]; then stop_pid "$QEMU_PID"; fi
  if [[ -n $ORIGIN_PID ]]; then stop_pid "$ORIGIN_PID"; fi
}
trap cleanup EXIT

packer/check.sh
step "template checks"

packer/build-image.sh
step "image"

rm -rf "$T"
mkdir -p "$T"
ssh_port=$(free_port)
front_port=$(free_port)
origin_port=$(free_port)

# The origin the appliance relays to: host loopback, 10.0.2.2 from the guest.
.venv/bin/python -m tests.origin "127.0.0.1:$origin_port" > "$T/origin.log" 2>&1 &
ORIGIN_PID=$!

# This boot's own key and seed; the image itself holds neither.
ssh-keygen -q -t ed25519 -N '' -C image-test -f "$T/id_ed25519"
cat > "$T/seed.env" <<EOF
PROXY_ID=image-test
UPSTREAM_URL=https://upstream.example:3302
PUBLIC_URL=https://127.0.0.1:2002
HOSTNAMES=agent-proxy 127.0.0.1
EOF
ssh_host appliance "$ssh_port" > "$T/ssh_config"
guest() { ssh -F "$T/ssh_config" appliance "$@"; }

qemu-img create -q -f qcow2 -b "$OUT/agent-proxy.qcow2" -F qcow2 "$T/disk.qcow2"
qemu-system-x86_64 -machine pc,accel=tcg -cpu max -smp 2 -m 1536 -display none \
  -drive "file=$T/disk.qcow2,if=virtio" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$ssh_port-:22,hostfwd=tcp:127.0.0.1:$front_port-:2002" \
  -device virtio-net,netdev=n0 \
  -fw_cfg "name=opt/agent-proxy/authorized_keys,file=$T/id_ed25519.pub" \
  -fw_cfg "name=opt/agent-proxy/seed.env,file=$T/seed.env" \
  -serial "file:$T/serial.log" > "$T/qemu.log" 2>&1 &
QEMU_PID=$!

deadline=$((SECONDS + BOOT_TIMEOUT))
until guest true 2>/dev/null; do
  kill -0 "$QEMU_PID" 2>/dev/null || fail "qemu exited: $(cat "$T/qemu.log")"
  if ((SECONDS > deadline)); then
    echo "test-image: last console lines ($T/serial.log):" >&2
    tail -n 25 "$T/serial.log" >&2
    fail "SSH did not answer within $BOOT_TIMEOUT s"
  fi
  sleep 2
done
step "boot until SSH answers"
if ! state=$(guest timeout 180 systemctl is-system-running --wait); then
  guest sudo systemctl --failed --no-legend >&2
  fail "the appliance finished booting '$state', not 'running'"
fi
guest sudo journalctl -b -o cat -u agent-proxy-firstboot > "$T/firstboot.log"
grep -q 'SHA-256 fingerprint' "$T/firstboot.log" || fail "first boot did not report the certificate: $(cat "$T/firstboot.log")"
secret=$(guest sudo cat /etc/agent-proxy/psk)
if guest sudo journalctl -b -o cat | grep -qF "$secret" || grep -qF "$secret" "$T/serial.log"; then
  fail "the shared secret appears in the journal or on the console"
fi
step "first boot (state $state; the secret is in no log)"

if [[ -n $(find tests/compliance -name 'test_*.py' ! -name test_lab_node.py) ]]; then
  .venv/bin/pytest tests/compliance --ignore=tests/compliance/test_lab_node.py -p no:cacheprovider -q \
    --hosts=ssh://appliance --ssh-config="$T/ssh_config" --sudo \
    --ap-summary="$T/compliance-summary.txt" --junitxml="$T/compliance.xml"
  step "compliance suite over SSH"
fi

# Relaying: the origin over plain HTTP and the host (10.0.2.2 to the guest) as an agent.
guest sudo /opt/agent-proxy/bin/python -I - <<'PY'
import yaml
path = "/etc/agent-proxy/agent-proxy.yaml"
data = yaml.safe_load(open(path))
data["upstream"] = {**data["upstream"], "allow_insecure": True}
networks = data.setdefault("networks", {})
networks["agents"] = list(networks.get("agents") or []) + ["10.0.2.2/32"]
open(path, "w").write(yaml.safe_dump(data, sort_keys=False))
PY
guest "sudo sed -i 's|https://upstream.example:3302|http://10.0.2.2:$origin_port|' /etc/agent-proxy/agent-proxy.yaml"
guest sudo /opt/agent-proxy/bin/agent-proxy check-config -c /etc/agent-proxy/agent-proxy.yaml
guest "sudo sh -euc 'cd /etc/agent-proxy/firewall
  /opt/agent-proxy/bin/agent-proxy render firewall-node -c ../agent-proxy.yaml --vars vars.yaml > rules.v4.new
  iptables-restore --test rules.v4.new && mv rules.v4.new rules.v4
  systemctl reload agent-proxy-firewall
  systemctl restart agent-proxy.target agent-proxy-front'"
wait_for 60 "https://127.0.0.1:$front_port/_proxy/health did not answer 200" \
  curl -sfk -o /dev/null "https://127.0.0.1:$front_port/_proxy/health"
curl -sSk --max-time 30 -D "$T/relay.headers" -o "$T/relay.json" -H 'X-Request-ID: image-test-1' \
  "https://127.0.0.1:$front_port/echo/image-test?x=1"
head -1 "$T/relay.headers" | grep -q ' 200' || fail "relay answered $(head -1 "$T/relay.headers")"
python3 - "$T/relay.json" <<'PY'
import json, sys
seen = json.load(open(sys.argv[1]))
headers = {name.lower(): value for name, value in seen["headers"]}
assert seen["target"] == "/echo/image-test?x=1", seen["target"]
assert headers.get("x-agent-proxy-id") == "image-test", headers
assert headers.get("x-agent-proxy-client-ip") == "10.0.2.2", headers
assert headers.get("x-request-id") == "image-test-1", headers
assert headers.get("x-agent-proxy-signature", "").startswith("v1 "), headers
print("test-image: relayed GET /echo/image-test?x=1 through :2002 to the origin, signed, as proxy image-test from 10.0.2.2")
PY
step "relay through :2002"

# A reload hands the listeners to a new HAProxy worker and the old one finishes. The root
# master must be able to signal its workers (user haproxy) for that, and for a stop that
# does not hang until systemd's timeout.
old_workers=$(guest pgrep -d, -u haproxy -x haproxy) || fail "no HAProxy worker runs as user haproxy"
guest sudo systemctl reload agent-proxy-front
old_workers_gone() { ! guest ps -p "$old_workers" > /dev/null; }
wait_for 30 "after systemctl reload agent-proxy-front, the old HAProxy worker(s) $old_workers did not exit" old_workers_gone
curl -sfk --max-time 10 -o /dev/null "https://127.0.0.1:$front_port/_proxy/health" || fail "the front does not answer after its reload"
step "front reload (old worker $old_workers gone)"

# A worker's reload checks the file first: on a broken config `systemctl reload` fails and
# the worker keeps serving; on a good one it succeeds.
guest "sudo sh -euc 'cp -p /etc/agent-proxy/agent-proxy.yaml /etc/agent-proxy/agent-proxy.yaml.good
  echo \"limts: {}\" >> /etc/agent-proxy/agent-proxy.yaml'"
if guest sudo systemctl reload agent-proxy@8002.service; then
  fail "systemctl reload agent-proxy@8002 succeeded on a broken config"
fi
guest sudo mv /etc/agent-proxy/agent-proxy.yaml.good /etc/agent-proxy/agent-proxy.yaml
guest sudo systemctl reload agent-proxy@8002.service
curl -sfk --max-time 10 -o /dev/null "https://127.0.0.1:$front_port/_proxy/health" || fail "the front does not answer after the worker reloads"
step "worker reload (refused on a broken config, done on a good one)"

guest sudo systemctl poweroff || [[ $? == 255 ]]  # the connection drops as it powers off
vm_off() { ! kill -0 "$QEMU_PID" 2>/dev/null; }
wait_for 60 "the VM did not power off (its console: $T/serial.log)" vm_off
QEMU_PID=
step "shutdown"
echo "test-image: PASS in $((SECONDS - total_start)) s"
