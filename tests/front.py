"""A node front for tests: real workers behind a real HAProxy rendered from the template, and a bounded load.

Everything runs on loopback. Loopback addresses other than 127.0.0.1 play the parts of a
balancer (127.0.0.2) and of agents (127.0.0.3 and up): Linux routes all of 127/8 to lo,
so a client socket bound to one of them is seen from it.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPSConnection
from pathlib import Path
from typing import Callable

import urllib3

from tests.helpers import AGENT_PROXY, Process, free_port, start_worker, wait_for_port, write_config

HAPROXY = "/usr/sbin/haproxy"
BALANCER, AGENT, LIMITED_AGENT = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MAX_CONN_PER_SOURCE = 40


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took, or fails naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (workers listen on listen.port, +1, ...)."""
    for _ in range(50):
        first = free_port()
        ports = list(range(first, first + count))
        try:
            for port in ports[1:]:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def render(name: str, config: Path, *variables: str) -> str:
    argv = [AGENT_PROXY, "render", name, "-c", str(config)]
    for item in variables:
        argv += ["--set", item] if "=" in item else ["--vars", item]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_haproxy(config_text: str, directory: Path, name: str) -> Process:
    path = directory / f"{name}.cfg"
    path.write_text(config_text)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    return Process(name, [HAPROXY, "-f", str(path)], directory / f"{name}.log").start()


def stats_command(socket_path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_stats(socket_path: str, backend: str) -> dict[str, dict[str, str]]:
    """`show stat` rows of ``backend``'s servers by name (status, scur, stot, ...)."""
    text = stats_command(socket_path, "show stat").lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {row["svname"]: row for row in rows if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}


def all_up(socket_path: str, backend: str) -> bool:
    try:
        return all(row["status"] == "UP" for row in server_stats(socket_path, backend).values())
    except OSError:
        return False


def start_origin(directory: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process("origin", [str(Path(AGENT_PROXY).with_name("python")), "-m", "tests.origin", f"127.0.0.1:{port}"], directory / "origin.log").start()
    wait_for_port("127.0.0.1", port, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class NodeFront:
    directory: Path
    config: Path
    port: int
    stats_socket: str
    cert: Path
    haproxy: Process | None
    workers: dict[int, Process] = field(default_factory=dict)
    metrics_port: int = 0  # HAProxy's Prometheus exporter (native mode)
    mode: str = "worker"   # front.mode

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start_worker(self, port: int) -> None:
        self.workers[port] = start_worker(self.config, self.directory, port, name="worker")

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for proc in self.workers.values():
            proc.stop()


def start_node(
    directory: Path, origin_url: str, workers: int, balancers: list[str], name: str = "node",
    mode: str = "worker", **overrides,
) -> NodeFront:
    """Workers and their HAProxy front from one config, as on an appliance; returns once all workers are UP.

    ``mode`` is front.mode; ``overrides`` are further top-level config keys (as write_config).
    In native mode the front's signing key map is written beside the secret, as the role does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ports, front_port = free_ports(workers), free_port()
    stats_socket = str(directory / "haproxy.sock")
    config = write_config(
        directory, origin_url,
        listen={"host": "127.0.0.1", "port": ports[0]},
        upstream={"read_timeout": 10, **overrides.pop("upstream", {})},
        front={"bind": "127.0.0.1", "port": front_port, "workers": workers, "balancers": balancers,
               "max_conn_per_source": MAX_CONN_PER_SOURCE, "stats_socket": stats_socket, "mode": mode},
        **overrides,
    )
    node = NodeFront(directory, config, front_port, stats_socket, directory / "proxy.crt", haproxy=None, mode=mode)
    try:
        for port in ports:
            node.start_worker(port)
        if mode == "native":
            key_map = directory / "psk.haproxy-map"
            key_map.write_text(render("node-haproxy-key", config))
            key_map.chmod(0o600)
        node.metrics_port = free_port()
        variables = ["log_format=raw", f"metrics_bind=127.0.0.1:{node.metrics_port}"]
        node.haproxy = start_haproxy(render("node-haproxy", config, *variables), directory, f"{name}-haproxy")
        wait_for_port("127.0.0.1", front_port, proc=node.haproxy)
        wait_until(lambda: all_up(stats_socket, "workers"), 10, f"{name}: workers UP in HAProxy")
    except BaseException:
        node.stop()
        raise
    return node


@dataclass
class LoadResult:
    ok: dict[str, int]
    failed: dict[str, list[str]]
    seconds: float
    client_retries: int


def run_load(http: urllib3.PoolManager, url: str, total: int, threads: int, at: int, action: Callable[[], None], post_every: int = 0, limit: float = 20) -> LoadResult:
    """``total`` requests from ``threads`` threads, bounded by ``limit`` seconds; ``action`` runs once after ``at`` of them.

    Every ``post_every``-th request is a POST (0: none). A request fails when it raises or
    does not answer 200.
    """
    lock, counter = threading.Lock(), iter(range(total))
    ok = {"GET": 0, "POST": 0}
    failed: dict[str, list[str]] = {"GET": [], "POST": []}
    done, retried, fired = [0], [0], threading.Event()
    deadline = time.monotonic() + limit

    def one(index: int) -> None:
        method = "POST" if post_every and index % post_every == 0 else "GET"
        try:
            response = http.request(method, f"{url}/echo?i={index}", body=b"x" * 100 if method == "POST" else None)
            good = response.status == 200
            reason = f"status {response.status}: {response.data[:200]!r}"
            retries = len(response.retries.history) if response.retries else 0
        except Exception as exc:  # the test counts every kind of failure
            good, reason, retries = False, repr(exc), 0
        with lock:
            retried[0] += retries
            if good:
                ok[method] += 1
            else:
                failed[method].append(reason)
            done[0] += 1
            fire = done[0] >= at and not fired.is_set()
            if fire:
                fired.set()
        if fire:
            action()

    def loop() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            one(index)

    start = time.monotonic()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(limit + 30)
    result = LoadResult(ok, failed, time.monotonic() - start, retried[0])
    assert sum(ok.values()) + sum(len(v) for v in failed.values()) == total, f"load did not finish within {limit} s: {result}"
    assert fired.is_set()
    return result


def proxy_v2_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A PROXY protocol v2 header (TCP over IPv4) claiming ``source`` as the client."""
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port, destination_port)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def echo_via(port: int, source: str, headers: dict | None = None, prefix: bytes = b"") -> dict:
    """GET /echo over TLS from ``source``, optionally after raw ``prefix`` bytes; the origin's record."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    raw.sendall(prefix)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.sock = context.wrap_socket(raw)
    connection.request("GET", "/echo", headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200, body
    return json.loads(body)


def headers_of(record: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return found


