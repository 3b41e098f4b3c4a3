"""A worker flooded with idle connections keeps answering health, and lets idle ones go.

A real `agent-proxy serve`, its agent listener and its control listener, and raw
sockets that connect and send nothing.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agent_proxy import config as configuration
from agent_proxy.server import worker_descriptors
from kit import AGENT_PROXY, Process, free_port, server_stats, start_node, start_origin, start_worker, wait_for_port, wait_until, write_config
from tests.origin import Origin

LIMIT = 2000  # limits.connection_limit's default: the flood is the 2,000 and then some
FLOOD = LIMIT + 200


@pytest.fixture(scope="module")
def origin():
    origin = Origin().start()
    yield origin
    origin.stop()


def get(port: int, path: str, timeout: float = 5) -> bytes:
    """One GET on a fresh connection; the status line, or b"" if nothing came back in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
        try:
            return sock.recv(65536).split(b"\r\n", 1)[0]
        except socket.timeout:
            return b""


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the worker closed this connection? (A peek that does not wait: b"" is the close.)"""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_health_answers_through_a_flood_of_idle_connections(origin, tmp_path):
    control_port = free_port()
    path = write_config(tmp_path, origin.url, listen_control={"host": "127.0.0.1", "port": control_port})
    config = configuration.load(path)
    assert config.limits.connection_limit == LIMIT
    proc = start_worker(path, tmp_path)
    port = yaml.safe_load(path.read_text())["listen"]["port"]
    flood: list[socket.socket] = []
    try:
        baseline = open_descriptors(proc.pid)
        for _ in range(FLOOD):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # The worker has taken the whole flood off its accept queue once it holds its limit.
        wait_until(lambda: open_descriptors(proc.pid) >= baseline + LIMIT - 10, 60, "the worker holds its connection limit")

        assert get(port, "/_proxy/health") == b"HTTP/1.1 200 OK", proc.output()[-2000:]
        assert get(control_port, "/_proxy/health") == b"HTTP/1.1 200 OK"
        assert get(port, "/echo") == b"HTTP/1.1 200 OK"  # an agent's call gets through too

        # Room was made by closing the longest-idle connections, never by holding more.
        assert open_descriptors(proc.pid) <= worker_descriptors(config)
        wait_until(lambda: sum(map(closed_by_peer, flood)) >= FLOOD - LIMIT, 20, "the oldest idle connections are closed")
        first, last = flood[: FLOOD - LIMIT], flood[-100:]
        assert all(closed_by_peer(s) for s in first), "room was made from other than the longest-idle"
        assert not any(closed_by_peer(s) for s in last)
    finally:
        for sock in flood:
            sock.close()
        assert proc.stop() == 0, proc.output()[-2000:]


def test_idle_connections_are_closed_after_the_idle_timeout(origin, tmp_path):
    path = write_config(tmp_path, origin.url, limits={"idle_timeout": 2})
    proc = start_worker(path, tmp_path)
    port = yaml.safe_load(path.read_text())["listen"]["port"]
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        # A connection busy for longer than the idle timeout is not idle: it gets its answer.
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: worker\r\n\r\n")
        started = time.monotonic()
        time.sleep(1)
        assert not any(closed_by_peer(s) for s in idle), "closed before the idle timeout"
        wait_until(lambda: all(closed_by_peer(s) for s in idle), 5, "idle connections closed after limits.idle_timeout")
        assert time.monotonic() - started >= 2 - 0.1
        busy.setblocking(True)
        assert busy.recv(65536).startswith(b"HTTP/1.1 200 OK")
        for sock in idle + [busy]:
            sock.close()
    finally:
        assert proc.stop() == 0, proc.output()[-2000:]


def test_a_worker_refuses_to_start_without_the_descriptors_its_limit_needs(origin, tmp_path):
    path = write_config(tmp_path, origin.url)
    need = worker_descriptors(configuration.load(path))
    argv = [AGENT_PROXY, "serve", "-c", str(path)]
    started = subprocess.run(["prlimit", f"--nofile={need - 100}:{need - 100}", *argv], capture_output=True, text=True, timeout=30)
    assert started.returncode == 2, started.stdout + started.stderr
    assert started.stderr.strip().splitlines() == [
        f"agent-proxy: {path}: limits.connection_limit: a worker may need {need} open files "
        f"(connections, pool, threads) but may open only {need - 100} (LimitNOFILE in its unit, ulimit -n)"
    ]
    # A soft limit below the need and a hard one above it: the worker raises its own and starts.
    proc = Process("raised", ["prlimit", f"--nofile=256:{need}", *argv], tmp_path / "raised.log").start()
    try:
        wait_for_port("127.0.0.1", yaml.safe_load(path.read_text())["listen"]["port"], proc=proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert re.search(rf"^Max open files\s+{need}\s+{need}\s", limits, re.M), limits
    finally:
        assert proc.stop() == 0, proc.output()[-2000:]


def test_the_node_front_keeps_a_flooded_worker_up(tmp_path):
    (tmp_path / "origin").mkdir()
    origin_proc, origin_url = start_origin(tmp_path / "origin")
    node = start_node(tmp_path / "node", origin_url, workers=1, balancers=[])
    flood: list[socket.socket] = []
    try:
        (port, worker), = node.workers.items()
        baseline = open_descriptors(worker.pid)
        for _ in range(FLOOD):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(lambda: open_descriptors(worker.pid) >= baseline + LIMIT - 10, 60, "the worker holds its connection limit")
        time.sleep(3)  # three health checks (inter 1 s); two failed ones (fall 2) take a worker out
        stats = server_stats(node.stats_socket, "workers")[f"worker{port}"]
        assert (stats["status"], stats["chkdown"]) == ("UP", "0"), stats
        context = ssl.create_default_context(cafile=str(node.cert))
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in flood:
            sock.close()
        node.stop()
        origin_proc.stop()
