#!/bin/bash
# The image test (in `make test` through packer/test-vms.sh, beside test-multinode.sh;
# alone: `make test-image`), on the image built (out/agent-proxy.qcow2): two boots under
# QEMU TCG with user networking (SSH and :2002 forwarded to 127.0.0.1 only):
#   1. a boot seed for a working node: an http:// upstream (an origin on the host's
#      loopback, 10.0.2.2 to the guest) with allow-insecure, the host as agent and admin
#      network, a static address, hostname and NTP server. Asserted: first boot OK, the
#      secret in no log, the compliance suite over SSH, a relay through :2002 with no
#      manual step, the front's log without the query string, `agent-proxy status` with
#      every row and no failed unit (and the same on /etc/issue and at login), the
#      registration at boot (its one line on the console, in the journal and in `status`),
#      control traffic apart (a signed control request refused on :2002, served on :2004),
#      `systemctl reload agent-proxy.target`, a broken config edit refused by
#      `agent-proxy apply` with the old config still serving, the good edit applied
#      (workers and front reloaded); then the package's life cycle on the node: the image's
#      package upgraded to a newer build under a bounded GET load through :2002 with no
#      failed request (the workers restarted one after the other), the config and keys
#      kept and a changed default of a conffile the operator edited not forced on it;
#      `dpkg -r` stops the services and keeps config and keys; a reinstall serves again;
#      `dpkg --purge` removes config, keys, state and enablement; a reinstall after it
#      that enables and starts nothing; then as a balancer (haproxy_lb's own front unit in
#      /etc/systemd/system): an upgrade and a purge leave that front running; power-off;
#   2. a seed that cannot work (an https upstream with an unreadable CA file), on a fresh
#      overlay: first boot's FAILED line with the reason on the console.
# The VMs and the origin are stopped by PID. Each step prints its time.
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

QEMU_PID= ORIGIN_PID= NEXT_PID= LOAD_PID=
cleanup() {
  if [[ -S $T/ssh-appliance ]] && ! ssh -F "$T/ssh_config" -O exit appliance 2>/dev/null; then
    echo "test-image: could not close the SSH control connection $T/ssh-appliance" >&2
  fi
  if [[ -n $QEMU_PID ]]; then stop_pid "$QEMU_PID"; fi
  if [[ -n $ORIGIN_PID ]]; then stop_pid "$ORIGIN_PID"; fi
  if [[ -n $NEXT_PID ]]; then stop_pid "$NEXT_PID"; fi
  if [[ -n $LOAD_PID ]]; then stop_pid "$LOAD_PID"; fi
}
trap cleanup EXIT

[[ -f $OUT/agent-proxy.qcow2 ]] || fail "no out/agent-proxy.qcow2: run packer/build-image.sh (make image) first"

rm -rf "$T"
mkdir -p "$T"
ssh_port=$(free_port)
front_port=$(free_port)
control_port=$(free_port)
origin_port=$(free_port)

# The next package for the life-cycle test, built while the VM boots: a newer version
# whose sysctl conffile has a changed default.
# (An image kept from an earlier run was built from the same inputs: the same package.)
deb=$(echo "$OUT"/agent-proxy_*_amd64.deb)
[[ -f $deb ]] || { deb/build.sh > "$T/deb.log" 2>&1 || fail "make deb failed: $(tail -n 20 "$T/deb.log")"; deb=$(echo "$OUT"/agent-proxy_*_amd64.deb); }
version=$(dpkg-deb -f "$deb" Version)
next_version=$version+lifecycle1
printf '\n# image-test-changed-default: a default changed in the next package\nnet.ipv4.tcp_keepalive_time = 600\n' > "$T/changed-default.conf"
DEB_OUT=$T/next DEB_VERSION=$next_version DEB_CHANGE=$T/changed-default.conf deb/build.sh > "$T/next-deb.log" 2>&1 &
NEXT_PID=$!

# The origin the appliance relays to: host loopback, 10.0.2.2 from the guest.
.venv/bin/python -m tests.origin "127.0.0.1:$origin_port" > "$T/origin.log" 2>&1 &
ORIGIN_PID=$!

# This boot's own key and seed; the image itself holds neither.
ssh-keygen -q -t ed25519 -N '' -C image-test -f "$T/id_ed25519"
cat > "$T/seed.env" <<SEED
PROXY_ID=image-test
UPSTREAM_URL=http://10.0.2.2:$origin_port
UPSTREAM_ALLOW_INSECURE=true
PUBLIC_URL=https://127.0.0.1:2002
HOSTNAMES=image-test1 127.0.0.1
AGENT_NETWORKS=10.0.2.2/32
UPSTREAM_NETWORKS=10.0.2.2/32
ADMIN_NETWORKS=10.0.2.2/32
HOSTNAME=image-test1
ADDRESS=10.0.2.15/24
GATEWAY=10.0.2.2
DNS=10.0.2.3
NTP_SERVERS=10.0.2.2
SEED
ssh_host appliance "$ssh_port" > "$T/ssh_config"
guest() { ssh -F "$T/ssh_config" appliance "$@"; }

# boot NAME SEED_ENV [NETDEV_OPTIONS]: a VM on a fresh overlay of the image; its console
# goes to $T/NAME.serial.log.
boot() {
  local name=$1 seed=$2 netdev=${3:-}
  qemu-img create -q -f qcow2 -b "$OUT/agent-proxy.qcow2" -F qcow2 "$T/$name.qcow2"
  "${QEMU[@]}" -smp 2 -m 1536 \
    -drive "file=$T/$name.qcow2,if=virtio" \
    -netdev "user,id=n0$netdev" -device virtio-net,netdev=n0 \
    -fw_cfg "name=opt/agent-proxy/authorized_keys,file=$T/id_ed25519.pub" \
    -fw_cfg "name=opt/agent-proxy/seed.env,file=$seed" \
    -serial "file:$T/$name.serial.log" > "$T/$name.qemu.log" 2>&1 &
  QEMU_PID=$!
}

boot node "$T/seed.env" ",hostfwd=tcp:127.0.0.1:$ssh_port-:22,hostfwd=tcp:127.0.0.1:$front_port-:2002,hostfwd=tcp:127.0.0.1:$control_port-:2004"
deadline=$((SECONDS + BOOT_TIMEOUT))
until guest true 2>/dev/null; do
  kill -0 "$QEMU_PID" 2>/dev/null || fail "qemu exited: $(cat "$T/node.qemu.log")"
  if ((SECONDS > deadline)); then
    echo "test-image: last console lines ($T/node.serial.log):" >&2
    tail -n 25 "$T/node.serial.log" >&2
    fail "SSH did not answer within $BOOT_TIMEOUT s"
  fi
  sleep 2
done
step "boot until SSH answers (first boot included: sshd starts after it)"
if ! state=$(guest timeout 180 systemctl is-system-running --wait); then
  guest systemctl --failed --no-legend >&2
  guest journalctl -b -o cat -u agent-proxy-firstboot >&2
  fail "the appliance finished booting '$state', not 'running'"
fi
# admin reads the journal without sudo (group systemd-journal).
guest journalctl -b -o cat -u agent-proxy-firstboot > "$T/firstboot.log"
grep -q '^agent-proxy-firstboot: OK: proxy image-test' "$T/firstboot.log" || fail "first boot did not end OK: $(cat "$T/firstboot.log")"
grep -qa 'agent-proxy-firstboot: OK: ' "$T/node.serial.log" || fail "the console does not show first boot's OK line"
secret=$(guest sudo cat /etc/agent-proxy/psk)
guest journalctl -b -o cat > "$T/journal.txt"
if grep -qF "$secret" "$T/journal.txt" || grep -qaF "$secret" "$T/node.serial.log"; then
  fail "the shared secret appears in the journal or on the console"
fi
[[ $(guest hostname) == image-test1 ]] || fail "the hostname is $(guest hostname), not the seed's image-test1"
[[ $(guest ip -o -4 addr show dev eth0) == *'inet 10.0.2.15/24 '*'valid_lft forever'* ]] \
  || fail "eth0 has not the seed's static address: $(guest ip -o -4 addr show dev eth0)"
[[ $(guest chronyc -n sources) == *' 10.0.2.2 '* ]] || fail "chrony does not use the seed's NTP server: $(guest chronyc -n sources)"
# Nothing of the build is left: its SSH key, Ansible's folders in the homes it ran in.
! guest grep -q agent-proxy-build .ssh/authorized_keys || fail "the build's SSH key is still authorized in the image"
leftovers=$(guest sudo find /root /home -maxdepth 2 -name .ansible)
[[ -z $leftovers ]] || fail "the build left Ansible's folders in the image: $leftovers"
step "first boot (state $state; OK on console and journal; secret in no log; hostname, address, NTP from the seed; no build leftovers)"

if [[ -n $(find tests/compliance -name 'test_*.py' ! -name test_lab_node.py) ]]; then
  # AP-TLS-08 (upstream verified over https) fails, rightly, for this seed's plain http
  # upstream (allow_insecure); the second boot covers an https upstream's CA file.
  compliance appliance compliance --deselect 'tests/compliance/test_tls.py::test_AP_TLS_08_upstream_verified'
  step "compliance suite over SSH"
fi

# relay TARGET: GET TARGET through the front from the host (10.0.2.2 to the guest, an
# agent); checks the signed headers and prints the target the origin received.
relay() {
  curl -sSk --max-time 30 -D "$T/relay.headers" -o "$T/relay.json" -H 'X-Request-ID: image-test-1' \
    "https://127.0.0.1:$front_port$1" || fail "relay of $1 through :2002 failed"
  head -1 "$T/relay.headers" | grep -q ' 200' || fail "relay of $1 answered $(head -1 "$T/relay.headers")"
  python3 - "$T/relay.json" <<'PY'
import json, sys
seen = json.load(open(sys.argv[1]))
headers = {name.lower(): value for name, value in seen["headers"]}
assert headers.get("x-agent-proxy-id") == "image-test", headers
assert headers.get("x-agent-proxy-client-ip") == "10.0.2.2", headers
assert headers.get("x-request-id") == "image-test-1", headers
assert headers.get("x-agent-proxy-signature", "").startswith("v1 "), headers
print(seen["target"])
PY
}
wait_for 60 "https://127.0.0.1:$front_port/_proxy/health did not answer 200" \
  curl -sfk -o /dev/null "https://127.0.0.1:$front_port/_proxy/health"
target=$(relay '/echo/image-test?token=image-test-query')
[[ $target == '/echo/image-test?token=image-test-query' ]] || fail "the origin received $target"
front_log() { guest journalctl -b -o cat -u agent-proxy-front.service; }
front_logged() { [[ $(front_log) == *'"GET /echo/image-test HTTP/1.1"'* ]]; }
wait_for 10 "the front's journal has no line for GET /echo/image-test" front_logged
if [[ $(front_log) == *image-test-query* ]]; then fail "the front's log holds the query string"; fi
step "relay through :2002 with no manual step, signed, from 10.0.2.2; the front's log without the query"

# Control traffic apart (the image sets listen_control): the host, 10.0.2.2, is an agent
# and the upstream in this seed; a request signed as the upstream signs is refused on the
# client port :2002 and served on the control port :2004. The secret goes in on stdin.
features() {  # features PORT: the status of a signed GET /_proxy/v2/features through PORT
  local auth
  auth=$(printf '%s' "$secret" | .venv/bin/python -c 'import sys
from agent_proxy import signing
print(signing.authorization(sys.stdin.read().encode(), "image-test", "GET", "/_proxy/v2/features"))')
  curl -sSk --max-time 10 -o "$T/features-$1.json" -w '%{http_code}' -H "Authorization: $auth" \
    "https://127.0.0.1:$1/_proxy/v2/features"
}
client_status=$(features "$front_port")
[[ $client_status == 404 ]] || fail "a signed /_proxy/v2/features on the client port answered $client_status: $(cat "$T/features-$front_port.json")"
control_status=$(features "$control_port")
[[ $control_status == 200 ]] || fail "a signed /_proxy/v2/features on the control port answered $control_status: $(cat "$T/features-$control_port.json")"
guest sudo iptables -S INPUT > "$T/input.rules"
grep -q -- '-s 10.0.2.2/32 -p tcp -m tcp --dport 2004 .*-j ACCEPT' "$T/input.rules" \
  || fail "the firewall does not admit UPSTREAM_NETWORKS on 2004: $(cat "$T/input.rules")"
step "control traffic apart: signed /_proxy/v2/features 404 on :2002, 200 on :2004 (firewall: 2004 from 10.0.2.2 only)"

# Registration at boot (agent-proxy-register.service, after the workers and the front).
# This seed's upstream is the scripted echo origin, which answers the registration 200:
# what is checked here is the wiring (one line on the console, in the journal and in
# `status`, the boot still running); tests/integration/test_boot_registration.py runs
# the script against the reference upstream.
guest journalctl -b -o cat -u agent-proxy-register > "$T/register.log"
[[ $(grep -c '^agent-proxy-register: ' "$T/register.log") == 1 ]] || fail "registration at boot did not say one line: $(cat "$T/register.log")"
register_line=$(grep '^agent-proxy-register: ' "$T/register.log")
[[ $register_line == "agent-proxy-register: OK: image-test "*" with http://10.0.2.2:$origin_port; the upstream reached this proxy at https://127.0.0.1:2002"* ]] \
  || fail "registration at boot said: $register_line"
grep -qaF "$register_line" "$T/node.serial.log" || fail "the console does not show the registration line"
guest test -f /var/lib/agent-proxy/registered-at-boot || fail "registration at boot left no mark"
step "registration at boot: ${register_line#agent-proxy-register: }"

guest agent-proxy status > "$T/status.txt" || fail "agent-proxy status says the node does not serve: $(cat "$T/status.txt")"
for row in 'host +image-test1' 'addresses +10\.0\.2\.15/24 \(eth0\)' 'proxy id +image-test' \
    "upstream +http://10\.0\.2\.2:$origin_port \(([0-9]+)/\1 workers ready\)" 'public url +https://127\.0\.0\.1:2002' \
    'certificate +SHA-256 [0-9A-F:]{95}, expires ' 'worker [0-9]+ +active, ready' 'front +active' \
    'failed units +none' 'first boot +.*OK: proxy image-test' "registration +.*: image-test .* with http://10\.0\.2\.2:$origin_port;"; do
  grep -Eq "^  $row" "$T/status.txt" || fail "agent-proxy status has no row /$row/: $(cat "$T/status.txt")"
done
guest sudo systemctl start agent-proxy-issue.service
guest cat /etc/issue > "$T/issue.txt"
grep -Eq '^  failed units +none' "$T/issue.txt" || fail "/etc/issue does not show the status: $(guest cat /etc/issue)"
guest sudo run-parts /etc/update-motd.d > "$T/motd.txt"
grep -Eq '^  proxy id +image-test' "$T/motd.txt" || fail "the login message does not show the status"
step "agent-proxy status (every row), /etc/issue and the login message"

reloads() { guest journalctl -b -o cat -u 'agent-proxy@*' | grep -c 'configuration reloaded' || [[ $? == 1 ]]; }
workers=$(grep -Ec '^  worker ' "$T/status.txt")
before=$(reloads)
guest sudo systemctl reload agent-proxy.target
reloaded() { (($(reloads) >= before + workers)); }
wait_for 20 "systemctl reload agent-proxy.target did not reload all $workers workers" reloaded
step "systemctl reload agent-proxy.target ($workers workers reloaded)"

# A broken edit: apply refuses it, changes no file, and the old config keeps serving.
CONFIG=/etc/agent-proxy/agent-proxy.yaml
installed() { guest sudo md5sum /etc/agent-proxy/firewall/rules.v4 /etc/agent-proxy/firewall/rules.v6 /etc/agent-proxy/haproxy.cfg; }
files_before=$(installed)
guest "sudo sed -i 's|^  url: http://10.0.2.2:$origin_port\$|  url: http://10.0.2.2:$origin_port/applied|' $CONFIG && echo 'upstream_typo: 1' | sudo tee -a $CONFIG > /dev/null"
if guest sudo agent-proxy apply > "$T/apply-broken.txt" 2>&1; then fail "agent-proxy apply accepted a broken config"; fi
grep -q 'upstream_typo' "$T/apply-broken.txt" || fail "agent-proxy apply did not name the bad key: $(cat "$T/apply-broken.txt")"
[[ $(installed) == "$files_before" ]] || fail "a refused apply changed the installed firewall or front files"
[[ $(relay /echo/after-broken) == /echo/after-broken ]] || fail "after a refused apply the workers do not serve the old config"
step "broken edit refused by apply ($(head -1 "$T/apply-broken.txt")); the old config serves"

# The same edit without the typo: applied, the workers use it, the front reloaded.
old_workers=$(guest pgrep -d, -u haproxy -x haproxy) || fail "no HAProxy worker runs as user haproxy"
guest "sudo sed -i '/^upstream_typo: 1\$/d' $CONFIG"
guest sudo agent-proxy apply > "$T/apply-good.txt" 2>&1 || fail "agent-proxy apply failed on a good config: $(cat "$T/apply-good.txt")"
[[ $(relay /echo/after-apply) == /applied/echo/after-apply ]] || fail "after apply the workers do not use the new upstream.url"
old_workers_gone() { ! guest ps -p "$old_workers" > /dev/null; }
wait_for 30 "after apply, the old HAProxy worker(s) $old_workers did not exit" old_workers_gone
failed_units=$(guest systemctl --failed --no-legend --plain)
[[ -z $failed_units ]] || fail "units failed after apply: $failed_units"
step "good edit applied ($(tail -1 "$T/apply-good.txt")); old HAProxy worker $old_workers gone"

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

# -- The package's life cycle on the node.
wait "$NEXT_PID" || fail "building the next package failed: $(tail -n 20 "$T/next-deb.log")"
NEXT_PID=
next_deb=$T/next/agent-proxy_${next_version}_amd64.deb
installed_version() { guest dpkg-query --show --showformat='\${db:Status-Abbrev}\${Version}' agent-proxy; }
[[ $(installed_version) == "ii $version" ]] || fail "the image holds agent-proxy '$(installed_version)', not the package out/ holds ($version)"
scp -q -F "$T/ssh_config" "$deb" "$next_deb" appliance:/tmp/
kept=(/etc/agent-proxy/agent-proxy.yaml /etc/agent-proxy/psk /etc/agent-proxy/tls/proxy.key /etc/agent-proxy/tls/proxy.crt)
kept_sums() { guest sudo md5sum "${kept[@]}"; }
sums_before=$(kept_sums)
SYSCTL=/etc/sysctl.d/60-agent-proxy.conf
guest "printf '# image-test-operator-setting\nnet.ipv4.tcp_keepalive_intvl = 30\n' | sudo tee -a $SYSCTL > /dev/null"
ports=$(guest systemctl list-units --plain --no-legend --state=active 'agent-proxy@*.service' | sed -n 's/^agent-proxy@\([0-9]*\)\.service.*/\1/p')
(($(wc -w <<< "$ports") >= 2)) || fail "fewer than two workers run ($ports): a rolling restart cannot be shown"
main_pids() { for port in $ports; do guest systemctl show -p MainPID --value "agent-proxy@$port.service"; done; }
pids_before=$(main_pids)
guest sudo cat /etc/agent-proxy/tls/proxy.crt > "$T/proxy.crt"
LOAD_URL=https://127.0.0.1:$front_port/ LOAD_CA=$T/proxy.crt
start_load upgrade 600
sleep 5  # the load runs before the upgrade starts
guest sudo dpkg -i --force-confdef --force-confold "/tmp/$(basename "$next_deb")" > "$T/upgrade.log" 2>&1 \
  || fail "the upgrade to $next_version failed: $(tail -n 20 "$T/upgrade.log")"
sleep 5  # and after it ends
end_load upgrade
[[ $(installed_version) == "ii $next_version" ]] || fail "after the upgrade dpkg says '$(installed_version)'"
pids_after=$(main_pids)
[[ -z $(comm -12 <(sort <<< "$pids_before") <(sort <<< "$pids_after")) ]] || fail "the upgrade left workers unrestarted: $pids_before -> $pids_after"
# One at a time: each worker stopped only after the one before it was back.
previous_back=0
for port in $ports; do
  grep -q "agent-proxy@$port.service restarted" "$T/upgrade.log" || fail "the upgrade did not restart agent-proxy@$port: $(cat "$T/upgrade.log")"
  stopped=$(guest systemctl show -p InactiveEnterTimestampMonotonic --value "agent-proxy@$port.service")
  ((stopped >= previous_back)) || fail "agent-proxy@$port stopped before the worker before it was back"
  previous_back=$(guest systemctl show -p ActiveEnterTimestampMonotonic --value "agent-proxy@$port.service")
done
[[ $(kept_sums) == "$sums_before" ]] || fail "the upgrade changed the config or the key material"
guest grep -q image-test-operator-setting "$SYSCTL" || fail "the upgrade replaced the operator's $SYSCTL"
if guest grep -q image-test-changed-default "$SYSCTL"; then fail "the upgrade forced its changed default onto the operator's $SYSCTL"; fi
guest grep -q image-test-changed-default "$SYSCTL.dpkg-dist" || fail "the new default is not beside it as $SYSCTL.dpkg-dist"
[[ $(relay /echo/after-upgrade) == /applied/echo/after-upgrade ]] || fail "after the upgrade the node does not relay"
step "upgrade $version -> $next_version under load: workers restarted one at a time, config, keys and the edited conffile kept"

guest sudo dpkg -r agent-proxy > "$T/remove.log" 2>&1 || fail "dpkg -r failed: $(cat "$T/remove.log")"
if states=$(guest systemctl is-active agent-proxy-front.service $(printf 'agent-proxy@%s.service ' $ports)); then
  fail "after dpkg -r a service still runs: $states"
fi
[[ $(kept_sums) == "$sums_before" ]] || fail "dpkg -r removed or changed the config or the key material"
guest test ! -e /opt/agent-proxy -a ! -e /usr/bin/agent-proxy || fail "dpkg -r left /opt/agent-proxy or /usr/bin/agent-proxy"
if curl -sk --max-time 5 -o /dev/null "https://127.0.0.1:$front_port/_proxy/health"; then fail "the front still answers after dpkg -r"; fi
step "dpkg -r: services stopped, program gone, config and keys kept"

guest sudo dpkg -i "/tmp/$(basename "$next_deb")" > "$T/reinstall.log" 2>&1 || fail "the reinstall failed: $(cat "$T/reinstall.log")"
wait_for 90 "after the reinstall the front did not answer" curl -sfk -o /dev/null "https://127.0.0.1:$front_port/_proxy/health"
[[ $(relay /echo/after-reinstall) == /applied/echo/after-reinstall ]] || fail "after the reinstall the node does not relay"
step "reinstall after dpkg -r: the node serves again with its config and keys"

guest sudo dpkg --purge agent-proxy > "$T/purge.log" 2>&1 || fail "dpkg --purge failed: $(cat "$T/purge.log")"
# (One string for the guest's shell: ls names what is left, find the enablement links.)
left=$(guest "sudo ls -d /etc/agent-proxy /var/lib/agent-proxy $SYSCTL $SYSCTL.dpkg-dist /etc/systemd/system/agent-proxy@.service.d 2>/dev/null;
  sudo find /etc/systemd/system -name 'agent-proxy@*.service' -o -name agent-proxy.target -o -name agent-proxy-front.service -o -name agent-proxy-firstboot.service")
[[ -z $left ]] || fail "dpkg --purge left: $left"
guest sudo dpkg -i "/tmp/$(basename "$deb")" > "$T/reinstall-purged.log" 2>&1 || fail "the reinstall after purge failed: $(cat "$T/reinstall-purged.log")"
[[ $(installed_version) == "ii $version" ]] || fail "after the reinstall dpkg says '$(installed_version)'"
[[ $(guest agent-proxy version) == "agent-proxy ${version%%+*}" ]] || fail "agent-proxy version says '$(guest agent-proxy version)'"
guest getent passwd agent-proxy > /dev/null || fail "the reinstall did not create the agent-proxy user"
guest test -d /var/lib/agent-proxy -a -d /etc/agent-proxy/tls || fail "the reinstall did not create /var/lib/agent-proxy and /etc/agent-proxy/tls"
step "dpkg --purge: config, keys, state and enablement gone; $version installed again"

# A first install enables and starts nothing of the node (a balancer installs the package too).
# (First boot ran at boot and stays active, RemainAfterExit; it must not be enabled again.)
for unit in agent-proxy.target agent-proxy-front.service agent-proxy-firstboot.service; do
  [[ $(guest systemctl is-enabled "$unit") == disabled ]] || fail "the install after purge enabled $unit"
done
for unit in agent-proxy.target agent-proxy-front.service; do
  if guest systemctl --quiet is-active "$unit"; then fail "the install after purge started $unit"; fi
done
# On a balancer, haproxy_lb runs the balancer in its own copy of agent-proxy-front.service
# in /etc/systemd/system, from /etc/agent-proxy/haproxy.cfg: an upgrade and a purge of the
# package leave it running, enabled and configured.
guest "sudo tee /etc/agent-proxy/haproxy.cfg > /dev/null" <<'CFG'
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend balancer
    bind 127.0.0.1:2999
    http-request return status 200
CFG
guest sudo cp /lib/systemd/system/agent-proxy-front.service /etc/systemd/system/
guest sudo systemctl daemon-reload
guest sudo systemctl enable --quiet --now agent-proxy-front.service
balancer_pid=$(guest systemctl show -p MainPID --value agent-proxy-front.service)
guest sudo dpkg -i "/tmp/$(basename "$next_deb")" > "$T/balancer-upgrade.log" 2>&1 \
  || fail "the upgrade on a balancer failed: $(cat "$T/balancer-upgrade.log")"
guest sudo dpkg --purge agent-proxy > "$T/balancer-purge.log" 2>&1 || fail "dpkg --purge on a balancer failed: $(cat "$T/balancer-purge.log")"
[[ $(guest systemctl show -p MainPID --value agent-proxy-front.service) == "$balancer_pid" ]] \
  || fail "the upgrade or the purge restarted or stopped the balancer's front"
[[ $(guest systemctl is-enabled agent-proxy-front.service) == enabled ]] || fail "the purge disabled the balancer's front"
guest test -f /etc/agent-proxy/haproxy.cfg || fail "the purge removed the balancer's /etc/agent-proxy/haproxy.cfg"
step "balancer: the install started nothing; upgrade and purge left the balancer's front running"

guest sudo systemctl poweroff || [[ $? == 255 ]]  # the connection drops as it powers off
vm_off() { ! kill -0 "$QEMU_PID" 2>/dev/null; }
wait_for 60 "the VM did not power off (its console: $T/node.serial.log)" vm_off
QEMU_PID=
step "shutdown"

# A seed that cannot work: first boot says so on the console, with the reason.
cat > "$T/bad-seed.env" <<SEED
PROXY_ID=image-test
UPSTREAM_URL=https://10.0.2.2:$origin_port
UPSTREAM_CA_FILE=/etc/agent-proxy/tls/missing-ca.pem
AGENT_NETWORKS=10.0.2.2/32
SEED
boot unworkable "$T/bad-seed.env"
failed_line() { grep -as 'agent-proxy-firstboot: FAILED: ' "$T/unworkable.serial.log"; }  # -s: the console file appears with the VM
wait_for "$BOOT_TIMEOUT" "the console showed no FAILED line for a seed with an unreadable CA file" failed_line
line=$(failed_line | head -1)
[[ $line == *upstream.ca_file*missing-ca.pem* ]] || fail "the FAILED line does not give the reason: $line"
stop_pid "$QEMU_PID"
QEMU_PID=
step "unworkable seed: ${line#*agent-proxy-firstboot: }"
echo "test-image: PASS in $((SECONDS - total_start)) s"
