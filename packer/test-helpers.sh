# Sourced by the VM tests (packer/test-image.sh, packer/test-multinode.sh) after they set
# TEST_NAME, the prefix of every line they print.
step_start=$SECONDS
# step WHAT: prints how long WHAT took since the previous step.
step() { echo "$TEST_NAME: $1 in $((SECONDS - step_start)) s"; step_start=$SECONDS; }
fail() { echo "$TEST_NAME: FAIL: $*" >&2; exit 1; }
# wait_for SECONDS FAILURE COMMAND...: until COMMAND succeeds; after SECONDS, fail with
# "FAILURE within SECONDS s".
wait_for() {
  local limit=$1 failure=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail "$failure within $limit s"
    sleep 1
  done
}
stop_pid() {  # stop_pid PID: TERM, wait up to 10 s, then KILL
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid"
}
# QEMU: the command line both VM tests start a guest with, their own size, disk, network
# and seed after it. TCG (KVM hangs on these machines); -nodefaults: no floppy, CD-ROM,
# parallel port or VGA, whose drivers the guest would load for nothing (a boot ~10 s
# shorter, measured on an idle machine).
QEMU=(qemu-system-x86_64 -machine pc,accel=tcg -cpu max -display none -nodefaults)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# ssh_host NAME PORT: an ssh_config block for the guest NAME at 127.0.0.1:PORT, with the
# test's key ($T/id_ed25519) and one SSH connection for the whole test (the compliance
# suite runs hundreds of commands; every new key exchange costs a TCG guest a second or
# more), its socket at $T/ssh-NAME. Keepalives give up on a guest after two silent
# minutes: sshd answers none while it opens a login session, and a starved TCG guest once
# took 41 s to do so, which the former 30 s limit turned into "mux_client_request_session:
# read from master failed: Broken pipe" (seen once in make test).
ssh_host() {
  cat <<EOF_HOST
Host $1
  HostName 127.0.0.1
  Port $2
  User admin
  IdentityFile $T/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 5
  ServerAliveInterval 10
  ServerAliveCountMax 12
  ControlMaster auto
  ControlPath $T/ssh-$1
  ControlPersist 900
EOF_HOST
}
# compliance HOST NAME [PYTEST OPTIONS...]: the compliance suite over SSH ($T/ssh_config,
# sudo) against HOST, its summary and JUnit XML as $T/NAME-summary.txt and $T/NAME.xml.
# --ap-probe-timeout 60: a TCG guest beside two others (make test) has taken over the
# default 10 s for one openssl s_client; the bound of a hang, not a check.
compliance() {
  local host=$1 name=$2
  shift 2
  .venv/bin/pytest tests/compliance --ignore=tests/compliance/test_lab_node.py -p no:cacheprovider -q \
    --hosts="ssh://$host" --ssh-config="$T/ssh_config" --sudo --ap-probe-timeout=60 \
    --ap-summary="$T/$name-summary.txt" --junitxml="$T/$name.xml" "$@"
}
# start_load NAME SECONDS: GETs to $LOAD_URL (verified with $LOAD_CA), 10 a second from
# 4 threads, in the background ($LOAD_PID), ended by end_load or at SECONDS.
start_load() {
  .venv/bin/python -m lab.load --url "$LOAD_URL" --ca-file "$LOAD_CA" \
    --rate 10 --seconds "$2" --threads 4 > "$T/load-$1.json" 2> "$T/load-$1.err" &
  LOAD_PID=$!
}
# end_load NAME: stops it and fails unless every GET was answered 200.
end_load() {
  kill -TERM "$LOAD_PID" 2>/dev/null \
    || fail "the load ($1) had stopped at its bound before the step was over (a slower machine: give start_load more seconds)"
  wait "$LOAD_PID" || fail "the load ($1) exited with $?: $(cat "$T/load-$1.err")"
  LOAD_PID=
  python3 - "$T/load-$1.json" "$1" "$TEST_NAME" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"{sys.argv[3]}: load during {sys.argv[2]}: {result['ok']} GETs answered 200, {result['failed']} failed, "
      f"{result['client_retries']} client retries, {result['seconds']} s")
if result["failed"] or result["ok"] < 20:
    sys.exit(f"{sys.argv[3]}: FAIL: the load during {sys.argv[2]} lost requests or barely ran: {result}")
PY
}
