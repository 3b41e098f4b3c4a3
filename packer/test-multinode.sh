#!/bin/bash
# Several nodes, one proxy, on booted VMs (in `make test` through packer/test-vms.sh, beside
# test-image.sh; alone: `make test-multinode`), on the image built: two qcow2 overlays of out/agent-proxy.qcow2 under QEMU TCG, each having made
# its own key material at first boot, then the site playbook over SSH with an inventory
# written here, and a balancer in front of them. Then, with the reference upstream on the
# host: `agent-proxy register` through the balancer, signed agent calls through each node,
# one certificate fingerprint seen by the upstream from both, the compliance suite on both,
# the site playbook again with agent_proxy_register (no change; the role's register task
# refreshes the registration from each node, as the upstream's log shows), rolling-upgrade.yml under a bounded load, and one
# node powered off under that load: no failed request.
#
# The balancer is HAProxy on the host's loopback, rendered from the same template
# (`agent-proxy render lb-haproxy`) the haproxy_lb role installs: a third VM would cost
# another boot and role run under TCG (minutes), for a balancer that only passes TCP.
# The site playbook runs with --limit proxies for that reason; rolling-upgrade.yml drives
# this balancer through its stats socket (`agent-proxy lb`) from the host.
#
# Every wait is bounded and says what did not happen; the VMs and the processes started
# here are stopped by PID. Environment: BOOT_TIMEOUT (seconds until SSH answers, default
# 600: two guests boot at once). Hold /tmp/agent-proxy-image.lock while it runs:
#   flock /tmp/agent-proxy-image.lock packer/test-multinode.sh
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=$REPO/out
T=$OUT/test-multinode
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
NODES=(node1 node2)
total_start=$SECONDS
TEST_NAME=test-multinode
# shellcheck source=packer/test-helpers.sh
source packer/test-helpers.sh

[[ -f $OUT/agent-proxy.qcow2 ]] || fail "no out/agent-proxy.qcow2: run packer/build-image.sh (make image) first"
[[ -x .venv/bin/ansible-playbook ]] || fail "no .venv/bin/ansible-playbook: run ansible/lint.sh first"

declare -A QEMU_PID=()
PIDS=()  # host processes: the apt repository, the balancer, the upstream, the load, the compliance runs
cleanup() {
  local node
  for node in "${NODES[@]}"; do
    if [[ -S $T/ssh-$node ]] && ! ssh -F "$T/ssh_config" -O exit "$node" 2>/dev/null; then
      echo "test-multinode: could not close the SSH control connection $T/ssh-$node" >&2
    fi
    if [[ -n ${QEMU_PID[$node]:-} ]]; then stop_pid "${QEMU_PID[$node]}"; fi
  done
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT

rm -rf "$T"
mkdir -p "$T"
declare -A SSH_PORT=() FRONT_PORT=()
for node in "${NODES[@]}"; do SSH_PORT[$node]=$(free_port); FRONT_PORT[$node]=$(free_port); done
lb_port=$(free_port) lb_monitor_port=$(free_port) upstream_port=$(free_port) apt_port=$(free_port)
# The guests see the host as 10.0.2.2 (QEMU user networking): the upstream, the apt
# repository and, as the source of the balancer's connections, the balancer.
HOST_FROM_GUEST=10.0.2.2

ssh-keygen -q -t ed25519 -N '' -C multinode-test -f "$T/id_ed25519"
for node in "${NODES[@]}"; do ssh_host "$node" "${SSH_PORT[$node]}"; done > "$T/ssh_config"
guest() { local node=$1; shift; ssh -F "$T/ssh_config" "$node" "$@"; }

# The boot seed a node needs to serve at all (the image's upstream is a placeholder): the
# host as a plain-http upstream; site.yml sets the real one. No identity: each node makes
# its own at first boot, and the role must make them one.
cat > "$T/seed.env" <<SEED
PROXY_ID=site-a
UPSTREAM_URL=http://$HOST_FROM_GUEST:$upstream_port
UPSTREAM_ALLOW_INSECURE=true
SEED

# -- boot both nodes from one image, each on its own overlay, in parallel
for node in "${NODES[@]}"; do
  qemu-img create -q -f qcow2 -b "$OUT/agent-proxy.qcow2" -F qcow2 "$T/$node.qcow2"
  "${QEMU[@]}" -smp 1 -m 1024 \
    -drive "file=$T/$node.qcow2,if=virtio" \
    -netdev "user,id=n0,hostname=$node,hostfwd=tcp:127.0.0.1:${SSH_PORT[$node]}-:22,hostfwd=tcp:127.0.0.1:${FRONT_PORT[$node]}-:2002" \
    -device virtio-net,netdev=n0 \
    -fw_cfg "name=opt/agent-proxy/authorized_keys,file=$T/id_ed25519.pub" \
    -fw_cfg "name=opt/agent-proxy/seed.env,file=$T/seed.env" \
    -serial "file:$T/$node-serial.log" > "$T/$node-qemu.log" 2>&1 &
  QEMU_PID[$node]=$!
done
deadline=$((SECONDS + BOOT_TIMEOUT))
for node in "${NODES[@]}"; do
  until guest "$node" true 2>/dev/null; do
    kill -0 "${QEMU_PID[$node]}" 2>/dev/null || fail "qemu of $node exited: $(cat "$T/$node-qemu.log")"
    if ((SECONDS > deadline)); then
      tail -n 25 "$T/$node-serial.log" >&2
      fail "SSH on $node did not answer within $BOOT_TIMEOUT s (its console above, $T/$node-serial.log)"
    fi
    sleep 2
  done
done
step "boot of ${NODES[*]} until SSH answers"
for node in "${NODES[@]}"; do
  if ! state=$(guest "$node" timeout 300 systemctl is-system-running --wait); then
    guest "$node" sudo systemctl --failed --no-legend >&2
    fail "$node finished booting '$state', not 'running'"
  fi
done
# First boot made each node its own material; node1 is made to have none, so that the
# role makes the proxy_id's material there, and node2 must give up what it made.
first_certificates=$(for node in "${NODES[@]}"; do guest "$node" sudo sha256sum /etc/agent-proxy/tls/proxy.crt | cut -d' ' -f1; done | sort -u | wc -l)
((first_certificates == ${#NODES[@]})) || fail "first boot gave the nodes $first_certificates certificate(s), expected one each"
guest node1 sudo rm /etc/agent-proxy/psk /etc/agent-proxy/tls/proxy.crt /etc/agent-proxy/tls/proxy.key
step "first boot (state running; node1's own material removed)"

# -- the host side: the local apt repository (the role's apt tasks), the upstream's
# certificate, the balancer
ln -s "$OUT/cache/apt" "$T/apt"
python3 -m http.server --bind 127.0.0.1 --directory "$T" "$apt_port" > "$T/apt-http.log" 2>&1 &
PIDS+=($!)
for node in "${NODES[@]}"; do
  guest "$node" "sudo sh -euc 'mv /etc/apt/sources.list /etc/apt/sources.list.debian
    echo \"deb [trusted=yes] http://$HOST_FROM_GUEST:$apt_port/apt/ ./\" > /etc/apt/sources.list.d/test-local.list'"
done
.venv/bin/python - "$T" "$HOST_FROM_GUEST" <<'PY'
import os, sys
from agent_proxy.tlsutil import self_signed
directory, address = sys.argv[1:]
cert, key = self_signed(address, [address, "127.0.0.1"])
open(os.path.join(directory, "upstream.crt"), "wb").write(cert)
fd = os.open(os.path.join(directory, "upstream.key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, key)
PY

cat > "$T/lb.yaml" <<EOF
proxy_id: site-a
upstream: {url: "https://$HOST_FROM_GUEST:$upstream_port"}
front: {bind: 127.0.0.1, port: $lb_port, stats_socket: $T/lb.sock}
EOF
{
  echo "monitor_port: $lb_monitor_port"
  echo "haproxy_user: haproxy"
  echo "log_format: raw"
  echo "nodes:"
  for node in "${NODES[@]}"; do echo "  - {name: $node, address: 127.0.0.1, port: ${FRONT_PORT[$node]}}"; done
} > "$T/lb-vars.yaml"
.venv/bin/agent-proxy render lb-haproxy -c "$T/lb.yaml" --vars "$T/lb-vars.yaml" > "$T/lb-haproxy.cfg"
haproxy -c -q -f "$T/lb-haproxy.cfg"
haproxy -f "$T/lb-haproxy.cfg" > "$T/lb-haproxy.log" 2>&1 &
PIDS+=($!)
lb() { .venv/bin/agent-proxy lb "$1" --socket "$T/lb.sock" --backend nodes --server "$2" --timeout 120; }
step "host side (apt repository :$apt_port, balancer :$lb_port)"

# -- the site playbook, over SSH, from an inventory written here
node_hosts=$(printf '        %s:\n' "${NODES[@]}")
cat > "$T/hosts.yml" <<EOF
# Written by packer/test-multinode.sh.
all:
  children:
    proxies:
      vars:
        # SSH finds each node's address, port, user and key in $T/ssh_config.
        ansible_python_interpreter: /usr/bin/python3
        agent_proxy_package_dir: $OUT
        agent_proxy_config:
          proxy_id: site-a
          public_url: https://127.0.0.1:$lb_port
          upstream:
            url: https://$HOST_FROM_GUEST:$upstream_port
          front:
            balancers: [$HOST_FROM_GUEST/32]
          networks:
            # Agents and the upstream reach the nodes through the balancer on the host's
            # loopback, which names them in its PROXY header.
            agents: [127.0.0.1/32]
            upstream: [127.0.0.1/32]
        agent_proxy_upstream_ca: "{{ lookup('ansible.builtin.file', '$T/upstream.crt') }}"
        # The one certificate of the proxy_id names the address agents and the upstream use.
        agent_proxy_tls_hostnames: [127.0.0.1]
        firewall_admin_networks: [$HOST_FROM_GUEST/32]
      hosts:
$node_hosts
    # rolling-upgrade.yml drains and readies the nodes on every balancer with
    # agent-proxy lb, run on the balancer: here the host itself.
    balancers:
      hosts:
        lb:
          ansible_connection: local
          ansible_python_interpreter: $REPO/.venv/bin/python
          ansible_become: false
          # Where rolling-upgrade.yml finds this balancer's runtime socket, as for a real one.
          haproxy_lb_config:
            front:
              stats_socket: $T/lb.sock
EOF
export ANSIBLE_CONFIG=$REPO/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_HOST_KEY_CHECKING=False
export ANSIBLE_HOME=$T/ansible-home ANSIBLE_LOCAL_TEMP=$T/ansible-home/tmp
# Ansible rides on the test's own SSH connection to each node ($T/ssh-NAME, opened while
# waiting for the boot), instead of opening one more login session per node and run.
export ANSIBLE_SSH_ARGS="-F $T/ssh_config -o ControlMaster=auto -o ControlPersist=900 -o ControlPath=$T/ssh-%n"
# A TCG guest sharing two cores with another (make test runs test-image.sh beside this) can
# take longer than Ansible's default 10 s to start sudo: seen once as "Timeout (12s)
# waiting for privilege escalation prompt" on the first task. The connection and become
# timeout, not a check (under Mitogen at least 120 s: packer/mitogen.sh).
export ANSIBLE_TIMEOUT=60
# Facts gathered by the first run serve the later ones (each module costs seconds under TCG).
export ANSIBLE_GATHERING=smart ANSIBLE_CACHE_PLUGIN=jsonfile ANSIBLE_CACHE_PLUGIN_CONNECTION=$T/facts
# Mitogen's strategy: the same roles, three times faster on TCG guests (packer/mitogen.sh).
# shellcheck source=packer/mitogen.sh
source packer/mitogen.sh
use_mitogen "$REPO/.venv" || fail "Mitogen's strategy is not available (above)"
# playbook NAME FILE ARGS...: runs it, keeps its output in $T/NAME.log, prints its recap.
playbook() {
  local name=$1 file=$2
  shift 2
  # stdin is a /dev/null of its own: ssh's ControlPersist masters and qemu share the
  # script's, and one of them leaving it non-blocking stopped a run with "Ansible requires
  # blocking IO on stdin" (seen once in make test).
  if ! .venv/bin/ansible-playbook -i "$T/hosts.yml" "ansible/playbooks/$file" "$@" < /dev/null > "$T/$name.log" 2>&1; then
    tail -n 40 "$T/$name.log" >&2
    fail "$file ($name) failed; its output: $T/$name.log"
  fi
  sed -n '/^PLAY RECAP/,$p' "$T/$name.log" | grep -E 'ok=' | sed 's/^/test-multinode:   /'
}
# Both nodes in one batch: a first deployment, not a code upgrade (site_rolling_batch).
playbook site-1 site.yml --limit proxies -e site_rolling_batch=2 -e agent_proxy_replace_key_material=true
step "site.yml, first run (node1 makes the proxy_id's material, node2's is replaced)"

for node in "${NODES[@]}"; do
  guest "$node" sudo sha256sum /etc/agent-proxy/psk /etc/agent-proxy/tls/proxy.crt /etc/agent-proxy/tls/proxy.key | cut -d' ' -f1 > "$T/$node.material"
done
cmp -s "$T/node1.material" "$T/node2.material" || fail "the nodes hold different key material: $(paste "$T/node1.material" "$T/node2.material")"
secret=$(guest node1 sudo cat /etc/agent-proxy/psk)
(umask 077; printf '%s\n' "$secret" > "$T/site-a.psk")
guest node1 sudo cat /etc/agent-proxy/tls/proxy.crt > "$T/proxy.crt"
for log in "$T/site-1.log"; do
  if grep -qF "$secret" "$log" || grep -qF "$(guest node1 sudo sed -n 2p /etc/agent-proxy/tls/proxy.key)" "$log"; then
    fail "the shared secret or the key appears in the playbook's output ($log)"
  fi
done

# -- the upstream (on the host, the guests reach it at 10.0.2.2), with the one secret; it
# verifies the nodes' TLS with the one certificate
.venv/bin/python -m agent_proxy.reference.upstream --listen "127.0.0.1:$upstream_port" \
  --cert "$T/upstream.crt" --key "$T/upstream.key" --proxy "site-a=$T/site-a.psk" \
  --proxy-ca "$T/proxy.crt" > "$T/upstream.log" 2>&1 &
PIDS+=($!)
all_up() { [[ $(.venv/bin/agent-proxy lb status --socket "$T/lb.sock" --backend nodes --server "$1") == *": UP,"* ]]; }
for node in "${NODES[@]}"; do
  wait_for 120 "the balancer did not see $node UP" all_up "$node"
done
step "same material on both (the secret in no output); upstream and balancer up"

# -- one proxy through the balancer: registration, signed calls, one fingerprint
fingerprint=$(openssl x509 -noout -fingerprint -sha256 -in "$T/proxy.crt" | cut -d= -f2)
operator() { curl -sS --max-time 10 --cacert "$T/upstream.crt" "https://127.0.0.1:$upstream_port/operator/v1/$1"; }
for node in "${NODES[@]}"; do
  other=$([[ $node == node1 ]] && echo node2 || echo node1)
  lb drain "$other" > /dev/null
  guest "$node" sudo /opt/agent-proxy/bin/agent-proxy register > "$T/register-$node.txt" \
    || fail "agent-proxy register on $node failed: $(cat "$T/register-$node.txt")"
  seen=$(operator proxies | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["certificate_sha256"])')
  [[ $seen == "$fingerprint" ]] || fail "through $node the upstream saw certificate $seen, not the proxy_id's $fingerprint"
  # An agent's call through this node: the node signs it, the upstream verifies it.
  status=$(curl -sS --max-time 30 --cacert "$T/proxy.crt" -o "$T/agent-$node.json" -w '%{http_code}' \
    -H 'Content-Type: application/json' -d "{\"instance_id\": \"agent-via-$node\", \"token\": \"token-of-agent-via-$node\"}" \
    "https://127.0.0.1:$lb_port/agent/v1/handshake")
  [[ $status == 200 ]] || fail "an agent's call through $node got $status: $(cat "$T/agent-$node.json")"
  lb ready "$other" > /dev/null
done
agents=$(operator agents | python3 -c 'import json, sys; print(" ".join(sorted(a["instance_id"] for a in json.load(sys.stdin))))')
[[ $agents == "agent-via-node1 agent-via-node2" ]] || fail "the upstream knows the agents '$agents'"
! grep -q signature-rejected "$T/upstream.log" || fail "the upstream refused a signature: $(grep signature-rejected "$T/upstream.log")"
echo "test-multinode: registered through the balancer via each node; one certificate $fingerprint; agents' calls signed by each node verified"
step "registration, signatures and the certificate through each node"

# One run per node, side by side: each waits mostly on its own guest's commands.
declare -A COMPLIANCE_PID=()
for node in "${NODES[@]}"; do
  compliance "$node" "compliance-$node" > "$T/compliance-$node.log" 2>&1 &
  COMPLIANCE_PID[$node]=$!
  PIDS+=($!)
done
for node in "${NODES[@]}"; do
  wait "${COMPLIANCE_PID[$node]}" \
    || { tail -n 40 "$T/compliance-$node.log" >&2; fail "the compliance suite failed on $node ($T/compliance-$node.log)"; }
  tail -n 1 "$T/compliance-$node.log" | sed "s/^/test-multinode: compliance on $node: /"
done
step "compliance suite on ${NODES[*]}"

# The second run registers too (agent_proxy_register: the role's register task against the
# reference upstream, on each node): the proxy is registered already, so each node's
# registration is a refresh, which the upstream logs and the role does not count as a change.
registrations() { awk '/"event": "registered"/ { n++ } END { print n + 0 }' "$T/upstream.log"; }
registered_before=$(registrations)
playbook site-2 site.yml --limit proxies -e site_rolling_batch=2 -e agent_proxy_register=true
if sed -n '/^PLAY RECAP/,$p' "$T/site-2.log" | grep -qE 'changed=[1-9]'; then
  fail "the second run of site.yml changed something ($T/site-2.log)"
fi
register_task=$(sed -n '/^TASK \[agent_proxy : Register the proxy with its upstream\]/,/^$/p' "$T/site-2.log")
for node in "${NODES[@]}"; do
  [[ $register_task == *"ok: [$node]"* ]] || fail "the role's register task did not run ok on $node: ${register_task:-no such task in $T/site-2.log}"
done
registered_after=$(registrations)
((registered_after - registered_before == ${#NODES[@]})) \
  || fail "the upstream logged $((registered_after - registered_before)) registrations during site.yml, expected ${#NODES[@]} ($T/upstream.log)"
step "site.yml, second run (changed nothing; the register task refreshed the registration from each node)"

# -- under a bounded load through the balancer: the rolling upgrade, then a node powered off
LOAD_URL=https://127.0.0.1:$lb_port/ LOAD_CA=$T/proxy.crt
# A bound, not a wait: the upgrade took 603 s and over 900 s in two make test runs on 12-06.
start_load rolling-upgrade 1800
PIDS+=("$LOAD_PID")
workers() { for node in "${NODES[@]}"; do guest "$node" pgrep -u agent-proxy | sed "s/^/$node:/"; done | sort; }
workers_before=$(workers)
[[ -n $workers_before ]] || fail "no worker runs as agent-proxy on the nodes"
# A copy of a unit in /etc/systemd/system would hide the package's (a hand edit, an old
# install): the role removes it.
guest node1 sudo cp /lib/systemd/system/agent-proxy-front.service /etc/systemd/system/
playbook rolling-upgrade rolling-upgrade.yml -e "rolling_agent_proxy=$REPO/.venv/bin/agent-proxy"
! guest node1 test -e /etc/systemd/system/agent-proxy-front.service \
  || fail "rolling-upgrade.yml left node1's copy of agent-proxy-front.service in /etc/systemd/system"
workers_after=$(workers)
[[ -z $(comm -12 <(echo "$workers_before") <(echo "$workers_after")) ]] \
  || fail "rolling-upgrade.yml left workers running that it was to replace: $(comm -12 <(echo "$workers_before") <(echo "$workers_after"))"
end_load rolling-upgrade
step "rolling-upgrade.yml under load (every worker replaced, no failed GET; a unit copy removed)"

start_load power-off 300
PIDS+=("$LOAD_PID")
sleep 5
guest node2 sudo systemctl poweroff || [[ $? == 255 ]]  # the connection drops as it powers off
vm_off() { ! kill -0 "${QEMU_PID[node2]}" 2>/dev/null; }
wait_for 90 "node2 did not power off (its console: $T/node2-serial.log)" vm_off
QEMU_PID[node2]=
node2_down() { [[ $(.venv/bin/agent-proxy lb status --socket "$T/lb.sock" --backend nodes --server node2) != *": UP,"* ]]; }
wait_for 30 "the balancer still counts node2 as UP" node2_down
sleep 10  # node1 alone carries the load for a while
end_load power-off
step "node2 powered off under load (no failed GET)"

echo "test-multinode: PASS in $((SECONDS - total_start)) s"
