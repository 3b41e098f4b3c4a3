"""`agent-proxy lb`: the real CLI against a real HAProxy's stats socket.

The HAProxy is a node front (kit/node.py: backend `workers`, servers `worker<port>`)
before two real workers and the test origin; it has the same runtime API as the balancer.
The last test drives a real balancer (lb-haproxy with control traffic apart) instead.
"""

from __future__ import annotations

import os
import socket as sockets
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest
import urllib3
import yaml

from kit import (
    AGENT_PROXY, REPO, VENV_BIN, all_up, free_port, free_ports, render, server_stats, start_haproxy, start_node, start_origin,
    wait_for_port, wait_until, write_config,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc, origin = start_origin(tmp_path_factory.mktemp("origin"))
    node = start_node(tmp_path_factory.mktemp("node"), origin, workers=2, balancers=[])
    yield node
    node.stop()
    proc.stop()


def lb(node, action: str, server: str, *extra: str, backend: str | None = "workers", socket: str | None = None,
       config: str | None = None):
    """`agent-proxy lb`; ``backend`` None names none (the command finds every backend with the server).
    With ``config`` (and no ``socket``), `-c CONFIG` instead of `--socket`: the socket is the config's."""
    where = ["-c", str(config)] if config and not socket else ["--socket", socket or node.stats_socket]
    argv = [AGENT_PROXY, "lb", action, *where, "--server", server, *extra]
    argv += ["--backend", backend] if backend else []
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def servers(node) -> list[str]:
    return [f"worker{port}" for port in sorted(node.workers)]


def test_status_says_up_with_no_connection(node):
    first = servers(node)[0]
    done = lb(node, "status", first)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"workers/{first}: UP, 0 connection(s), check L7OK\n"


def test_drain_then_ready_moves_the_server_out_of_rotation_and_back(node):
    first = servers(node)[0]
    done = lb(node, "drain", first)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{first}: DRAIN,")
    assert server_stats(node.stats_socket, "workers")[first]["status"] == "DRAIN"
    done = lb(node, "ready", first, "--timeout", "10")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{first}: UP,")
    assert server_stats(node.stats_socket, "workers")[first]["status"] == "UP"


def test_wait_idle_waits_for_the_request_in_flight_and_times_out_before_it_ends(node):
    first, second = servers(node)
    assert lb(node, "drain", first).returncode == 0
    http = urllib3.PoolManager(ca_certs=str(node.cert), retries=False, timeout=20)
    answer: dict = {}
    slow = threading.Thread(target=lambda: answer.update(status=http.request("GET", f"{node.url}/slow?s=3").status))
    try:
        slow.start()
        # The drained worker gets nothing new: the slow request is on the other one.
        wait_until(lambda: server_stats(node.stats_socket, "workers")[second]["scur"] == "1", 5, f"{second} carries the request")
        early = lb(node, "wait-idle", second, "--timeout", "0.5")
        assert early.returncode == 1
        assert early.stderr == (f"agent-proxy: lb wait-idle: workers/{second} not idle (no connection) within 0.5 s; "
                                f"now UP with 1 connection(s)\n")
        started = time.monotonic()
        idle = lb(node, "wait-idle", second, "--timeout", "10")
        took = time.monotonic() - started
        assert idle.returncode == 0, idle.stderr
        assert idle.stdout.startswith(f"workers/{second}: UP, 0 connection(s)")
        slow.join(10)
        assert answer == {"status": 200}
        # It waited for the request (3 s), and returned when it ended, not at its 10 s timeout.
        assert 1 < took < 9, f"wait-idle returned after {took:.1f} s; the request took 3 s"
    finally:
        slow.join(10)
        assert lb(node, "ready", first, "--timeout", "10").returncode == 0


@pytest.mark.parametrize("backend, server, message", [
    ("workers", "worker1", "backend 'workers' has no server 'worker1'"),
    ("nodes", "worker1", "no backend 'nodes' (backends: "),
    (None, "worker1", "no backend has a server 'worker1'"),
])
def test_an_unknown_name_is_a_usage_error(node, backend, server, message):
    done = lb(node, "drain", server, backend=backend)
    assert done.returncode == 2
    assert done.stderr.startswith(f"agent-proxy: lb drain: {node.stats_socket}: {message}")
    assert done.stderr.count("\n") == 1


def test_the_node_config_names_the_socket(node):
    """`-c` alone: the socket is the node config's front.stats_socket (as restart-workers calls it)."""
    first = servers(node)[0]
    done = lb(node, "drain", first, backend=None, config=node.config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{first}: DRAIN,")
    assert server_stats(node.stats_socket, "workers")[first]["status"] == "DRAIN"
    done = lb(node, "ready", first, "--timeout", "10", backend=None, config=node.config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{first}: UP,")
    assert server_stats(node.stats_socket, "workers")[first]["status"] == "UP"


def test_a_failed_feature_does_not_stop_lb(node, tmp_path):
    """The socket is all `lb` reads: an unreadable upstream.ca_file (which stops check-config
    and register) must not stop a drain in an upgrade."""
    config = write_config(tmp_path, "https://127.0.0.1:9", upstream={"ca_file": str(tmp_path / "none.pem")},
                          front={"stats_socket": node.stats_socket})
    done = lb(node, "status", servers(node)[0], config=config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{servers(node)[0]}: UP,")


def test_socket_wins_over_the_config(node, tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:9", front={"stats_socket": str(tmp_path / "none.sock")})
    done = lb(node, "status", servers(node)[0], "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"workers/{servers(node)[0]}: UP,")


def stale_socket(path: str) -> sockets.socket:
    """A socket file nobody listens on (what a killed HAProxy leaves behind)."""
    sock = sockets.socket(sockets.AF_UNIX)
    sock.bind(path)
    return sock


@pytest.mark.parametrize("stale, reason", [
    (False, "no such socket (is agent-proxy-front running?)"),
    (True, "nothing listens on it (is agent-proxy-front running?)"),
])
@pytest.mark.parametrize("given", ["--socket", "-c"])
def test_a_socket_that_cannot_be_used_is_one_line_naming_its_path_and_origin(node, tmp_path, given, stale, reason):
    path = str(tmp_path / "none.sock")
    config = write_config(tmp_path, "http://127.0.0.1:9", front={"stats_socket": path})
    leftover = stale_socket(path) if stale else None
    try:
        done = lb(node, "status", servers(node)[0], socket=path if given == "--socket" else None, config=config)
    finally:
        if leftover:
            leftover.close()
    origin = "--socket" if given == "--socket" else f"front.stats_socket in {config}"
    assert done.returncode == 1
    assert done.stderr == f"agent-proxy: lb status: {origin}: {path}: {reason}\n"


@pytest.mark.parametrize("fault, problem", [
    ("missing", "cannot read: No such file or directory"),
    ("not YAML", "not valid YAML (line 2): expected ',' or ']', but got '<stream end>'"),
    ("bad value", "front.stats_socket: must be a non-empty string, got ['a']"),
])
def test_a_config_that_does_not_load_is_a_usage_error(node, tmp_path, fault, problem):
    config = tmp_path / "agent-proxy.yaml"
    if fault == "not YAML":
        config.write_text("front: [stats_socket\n")
    elif fault == "bad value":
        write_config(tmp_path, "http://127.0.0.1:9", front={"stats_socket": ["a"]})
    done = lb(node, "drain", servers(node)[0], config=config)
    assert done.returncode == 2
    assert done.stderr == f"agent-proxy: {config}: {problem}\n"
    assert server_stats(node.stats_socket, "workers")[servers(node)[0]]["status"] == "UP"


def test_ready_fails_when_the_server_never_comes_up(node, tmp_path):
    first = servers(node)[0]
    port = int(first.removeprefix("worker"))
    node.workers[port].stop()
    try:
        wait_until(lambda: server_stats(node.stats_socket, "workers")[first]["status"] == "DOWN", 10, f"{first} DOWN")
        done = lb(node, "ready", first, "--timeout", "1")
        assert done.returncode == 1
        assert done.stderr.startswith(f"agent-proxy: lb ready: workers/{first} not UP within 1 s; now DOWN")
    finally:
        node.start_worker(port)
        wait_until(lambda: server_stats(node.stats_socket, "workers")[first]["status"] == "UP", 10, f"{first} UP again")



@dataclass
class Balancer:
    socket: str
    node: object


@pytest.fixture(scope="module")
def balancer(tmp_path_factory):
    """A real balancer (lb-haproxy) with control traffic apart before one real node, node1:
    the node is a server of both `nodes` and `control_nodes`."""
    tmp_path = tmp_path_factory.mktemp("site")
    origin, origin_url = start_origin(tmp_path)
    control_port = free_port()
    node = start_node(tmp_path / "node", origin_url, workers=1, balancers=["127.0.0.1/32"], name="node1",
                      listen_control={"host": "127.0.0.1", "port": free_ports(1)[0]},
                      front={"control_port": control_port}, networks={"agents": ["127.0.0.0/8"], "upstream": ["127.0.0.1/32"]})
    proc = None
    try:
        directory = tmp_path / "balancer"
        directory.mkdir()
        socket = str(directory / "haproxy.sock")
        port = free_port()
        config = write_config(directory, origin_url, listen_control={"host": "127.0.0.1", "port": free_port()},
                              front={"bind": "127.0.0.1", "port": port, "control_port": free_port(), "stats_socket": socket})
        variables = directory / "nodes.yaml"
        variables.write_text(yaml.safe_dump({"nodes": [
            {"name": "node1", "address": "127.0.0.1", "port": node.port, "control_port": control_port}]}))
        proc = start_haproxy(render("lb-haproxy", config, str(variables), f"monitor_port={free_port()}", "check_inter=200ms"),
                             directory, "balancer")
        wait_for_port("127.0.0.1", port, proc=proc)
        wait_until(lambda: all_up(socket, "nodes") and all_up(socket, "control_nodes"), 10, "node1 UP in both backends")
        yield Balancer(socket, node)
    finally:
        if proc is not None:
            proc.stop()
        node.stop()
        origin.stop()


def node1(balancer: Balancer) -> dict[str, str]:
    return {backend: server_stats(balancer.socket, backend)["node1"]["status"] for backend in ("nodes", "control_nodes")}


def test_a_node_is_drained_and_put_back_in_every_backend_of_a_balancer(balancer):
    """Named no backend, `lb` acts on node1 in `nodes` and `control_nodes`."""
    socket, node = balancer.socket, balancer.node
    drained = lb(node, "drain", "node1", backend=None, socket=socket)
    assert drained.returncode == 0, drained.stderr
    assert [line.split(", ")[0] for line in drained.stdout.splitlines()] == ["nodes/node1: DRAIN", "control_nodes/node1: DRAIN"]
    assert node1(balancer) == {"nodes": "DRAIN", "control_nodes": "DRAIN"}
    one = lb(node, "ready", "node1", "--timeout", "10", backend="nodes", socket=socket)
    assert one.returncode == 0 and one.stdout.startswith("nodes/node1: UP,") and one.stdout.count("\n") == 1
    assert node1(balancer) == {"nodes": "UP", "control_nodes": "DRAIN"}
    back = lb(node, "ready", "node1", "--timeout", "10", backend=None, socket=socket)
    assert back.returncode == 0, back.stderr
    assert [line.split(", ")[0] for line in back.stdout.splitlines()] == ["nodes/node1: UP", "control_nodes/node1: UP"]
    # The same states and connections; the check field is HAProxy's live probe, which may
    # be in progress ("* L7OK") at one call and not the next.
    def states(out: str) -> list[str]:
        return [line.split(", check ")[0] for line in out.splitlines()]
    status = lb(node, "status", "node1", backend=None, socket=socket)
    assert states(status.stdout) == states(back.stdout) == ["nodes/node1: UP, 0 connection(s)", "control_nodes/node1: UP, 0 connection(s)"]


ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"


def rolling_upgrade(tmp_path, balancer: Balancer, tags: str) -> subprocess.CompletedProcess:
    """ansible/playbooks/rolling-upgrade.yml, only its balancer steps (``tags``), for proxy
    node1 and one balancer, both this machine (local connections)."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python"), "ansible_become": False}
    # The balancer's socket as an operator gives it: in the balancer's own variables.
    balancer_vars = {"haproxy_lb_config": {"front": {"stats_socket": balancer.socket}}}
    inventory = {"all": {"vars": local, "children": {
        "proxies": {"hosts": {"node1": {}}}, "balancers": {"hosts": {"lb": balancer_vars}},
    }}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg")}
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), str(REPO / "ansible" / "playbooks" / "rolling-upgrade.yml"),
         "--tags", tags, "-e", f"rolling_agent_proxy={AGENT_PROXY} rolling_up_timeout=10"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO / "ansible")


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not in .venv: run ansible/lint.sh")
def test_the_rolling_upgrade_playbook_takes_a_node_out_of_every_backend_and_back(balancer, tmp_path):
    out = rolling_upgrade(tmp_path, balancer, "lb_drain,lb_wait_idle")
    assert out.returncode == 0, out.stdout + out.stderr
    assert node1(balancer) == {"nodes": "DRAIN", "control_nodes": "DRAIN"}
    # Back in `nodes` only: the playbook's check must see control_nodes still out.
    assert lb(balancer.node, "ready", "node1", "--timeout", "10", backend="nodes", socket=balancer.socket).returncode == 0
    half = rolling_upgrade(tmp_path, balancer, "lb_status")
    assert half.returncode == 2, half.stdout
    assert "control_nodes/node1: DRAIN" in half.stdout and "Check that every balancer has the node UP" in half.stdout
    back = rolling_upgrade(tmp_path, balancer, "lb_ready")
    assert back.returncode == 0, back.stdout + back.stderr
    assert node1(balancer) == {"nodes": "UP", "control_nodes": "UP"}
