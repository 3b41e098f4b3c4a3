"""`agent-proxy lb`: the real CLI against a real HAProxy's stats socket.

The HAProxy is a node front (kit/node.py: backend `workers`, servers `worker<port>`)
before two real workers and the test origin; it has the same runtime API as the balancer.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import urllib3

from kit import AGENT_PROXY, server_stats, start_node, start_origin, wait_until


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc, origin = start_origin(tmp_path_factory.mktemp("origin"))
    node = start_node(tmp_path_factory.mktemp("node"), origin, workers=2, balancers=[])
    yield node
    node.stop()
    proc.stop()


def lb(node, action: str, server: str, *extra: str, backend: str = "workers", socket: str | None = None):
    argv = [AGENT_PROXY, "lb", action, "--socket", socket or node.stats_socket, "--backend", backend, "--server", server, *extra]
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
        assert 1 < took < 5, f"wait-idle returned after {took:.1f} s; the request took 3 s"
    finally:
        slow.join(10)
        assert lb(node, "ready", first, "--timeout", "10").returncode == 0


@pytest.mark.parametrize("backend, server, message", [
    ("workers", "worker1", "backend 'workers' has no server 'worker1'"),
    ("nodes", "worker1", "no backend 'nodes' (backends: "),
])
def test_an_unknown_name_is_a_usage_error(node, backend, server, message):
    done = lb(node, "drain", server, backend=backend)
    assert done.returncode == 2
    assert done.stderr.startswith(f"agent-proxy: lb drain: {node.stats_socket}: {message}")
    assert done.stderr.count("\n") == 1


def test_a_missing_socket_is_a_runtime_failure(node, tmp_path):
    done = lb(node, "status", servers(node)[0], socket=str(tmp_path / "none.sock"))
    assert done.returncode == 1
    assert done.stderr == f"agent-proxy: lb status: cannot use the HAProxy stats socket {tmp_path / 'none.sock'}: No such file or directory\n"


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
