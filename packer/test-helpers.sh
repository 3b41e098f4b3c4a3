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
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# ssh_host NAME PORT: an ssh_config block for the guest NAME at 127.0.0.1:PORT, with the
# test's key ($T/id_ed25519) and one SSH connection for the whole test (the compliance
# suite runs hundreds of commands; every new key exchange costs a TCG guest a second or
# more), its socket at $T/ssh-NAME.
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
  ServerAliveInterval 5
  ServerAliveCountMax 6
  ControlMaster auto
  ControlPath $T/ssh-$1
  ControlPersist 900
EOF_HOST
}
