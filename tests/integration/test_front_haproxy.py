"""The node front (haproxy/node-haproxy.cfg.j2) as a real HAProxy in front of real workers.

Everything runs on loopback: an origin standing in for the upstream (``python -m
tests.origin``, whose /echo answer says what it received), two `agent-proxy serve`
workers, and HAProxy with the rendered configuration. Loopback addresses other than
127.0.0.1 play the parts of a balancer (127.0.0.2) and of agents (127.0.0.3 and up):
Linux routes all of 127/8 to lo, so a client socket bound to one of them is seen from it.
"""

from __future__ import annotations

import csv
import io
import json
import signal
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

import pytest
import urllib3

from agent_proxy import signing
from agent_proxy.tlsutil import fingerprint
from tests.helpers import AGENT_PROXY, SECRET, Process, free_port, start_worker, wait_for_port, write_config

HAPROXY = "/usr/sbin/haproxy"
BALANCER, AGENT, LIMITED_AGENT = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MAX_CONN_PER_SOURCE = 40


# -- shared with test_front_balancer.py


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


def start_node(directory: Path, origin_url: str, workers: int, balancers: list[str], name: str = "node") -> NodeFront:
    """Workers and their HAProxy front from one config, as on an appliance; returns once all workers are UP."""
    directory.mkdir(parents=True, exist_ok=True)
    ports, front_port = free_ports(workers), free_port()
    stats_socket = str(directory / "haproxy.sock")
    config = write_config(
        directory, origin_url,
        listen={"host": "127.0.0.1", "port": ports[0]},
        upstream={"read_timeout": 10},
        front={"bind": "127.0.0.1", "port": front_port, "workers": workers, "balancers": balancers,
               "max_conn_per_source": MAX_CONN_PER_SOURCE, "stats_socket": stats_socket},
    )
    node = NodeFront(directory, config, front_port, stats_socket, directory / "proxy.crt", haproxy=None)
    try:
        for port in ports:
            node.start_worker(port)
        node.haproxy = start_haproxy(render("node-haproxy", config, "log_format=raw"), directory, f"{name}-haproxy")
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


# -- the node front


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    proc, url = start_origin(tmp_path_factory.mktemp("origin"))
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def node(origin, tmp_path_factory):
    node = start_node(tmp_path_factory.mktemp("node"), origin, workers=2, balancers=[f"{BALANCER}/32"])
    yield node
    node.stop()


@pytest.fixture
def http(node):
    return urllib3.PoolManager(maxsize=16, block=True, retries=False, ca_certs=str(node.cert), timeout=urllib3.Timeout(connect=5, read=20))


def test_origin_sees_the_real_client_whatever_it_claims(node):
    record = echo_via(node.port, AGENT, headers={
        "X-Forwarded-For": "10.6.6.6", "Forwarded": "for=10.6.6.6", "X-Real-IP": "10.6.6.6",
        "X-Agent-Proxy-Client-IP": "10.6.6.6",
    })
    got = headers_of(record)
    assert got["x-agent-proxy-client-ip"] == [AGENT]
    assert got["x-forwarded-for"] == [AGENT]
    assert got["x-forwarded-proto"] == ["https"]
    assert got["forwarded"] == [f'for="{AGENT}";by="site-a";proto=https']
    assert "x-real-ip" not in got
    signing.verify_signature_header(got["x-agent-proxy-signature"][0], SECRET.encode(), "site-a", "GET", "/echo", AGENT)


@pytest.mark.parametrize("version", ["tls1", "tls1_1"])
def test_tls_before_1_2_is_refused_by_the_front(node, version):
    # SECLEVEL=0 lets this OpenSSL offer the old versions; the alert then comes from HAProxy.
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{node.port}", f"-{version}", "-cipher", "DEFAULT@SECLEVEL=0"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
    )
    assert done.returncode != 0
    assert "alert protocol version" in done.stdout + done.stderr


@pytest.mark.parametrize("version,protocol", [("tls1_2", "TLSv1.2"), ("tls1_3", "TLSv1.3")])
def test_tls_1_2_and_1_3_serve_the_configured_certificate(node, version, protocol):
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{node.port}", f"-{version}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert f"New, {protocol}, Cipher is" in done.stdout
    served = done.stdout[done.stdout.index("-----BEGIN CERTIFICATE-----"):done.stdout.index("-----END CERTIFICATE-----") + 25]
    assert fingerprint(served.encode()) == fingerprint(node.cert.read_bytes())


def test_proxy_header_is_believed_from_balancers_only(node):
    header = proxy_v2_header("127.0.0.9", "127.0.0.1", 40000, node.port)
    record = echo_via(node.port, BALANCER, prefix=header)
    assert headers_of(record)["x-agent-proxy-client-ip"] == ["127.0.0.9"]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        echo_via(node.port, AGENT, prefix=header)
    # An agent without a PROXY header is served as itself.
    assert headers_of(echo_via(node.port, AGENT))["x-agent-proxy-client-ip"] == [AGENT]


def test_concurrent_connections_per_source_are_limited(node):
    context = ssl.create_default_context(cafile=str(node.cert))

    def connect(source: str) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=10, source_address=(source, 0))
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    def table_count() -> str:
        table = stats_command(node.stats_socket, "show table agent_proxy")
        return next((line.split("conn_cur=")[1] for line in table.splitlines() if f"key=::ffff:{LIMITED_AGENT} " in line), "0")

    held = [connect(LIMITED_AGENT) for _ in range(MAX_CONN_PER_SOURCE)]
    try:
        wait_until(lambda: table_count() == str(MAX_CONN_PER_SOURCE), 5, "the stick table counts the held connections")
        extra = connect(LIMITED_AGENT)
        extra.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = extra.recv(100)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert answer == b"", "a connection over the per-source limit was served"
        extra.close()
        # Another source is not affected.
        assert headers_of(echo_via(node.port, AGENT))["x-agent-proxy-client-ip"] == [AGENT]
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: table_count() == "0", 5, "the count drops when the connections close")


def test_killing_a_worker_under_load_fails_no_request(node, http):
    victim_port = min(node.workers)
    victim = node.workers[victim_port]
    result = run_load(http, node.url, total=2000, threads=16, at=500, action=lambda: victim.signal(signal.SIGKILL), limit=15)
    # The front re-sends every GET the dead worker had not begun to answer; a worker sends
    # a small answer's header block and body in one write, so none arrives cut short.
    print(f"GETs: {result.ok['GET']} ok, {len(result.failed['GET'])} failed, {result.seconds:.1f} s")
    assert result.failed["GET"] == [], result.failed["GET"][:5]
    assert result.seconds <= 15
    assert victim.popen.wait(5) == -signal.SIGKILL
    wait_until(lambda: server_stats(node.stats_socket, "workers")[f"worker{victim_port}"]["status"] == "DOWN", 5, "the killed worker is marked DOWN")
    node.start_worker(victim_port)
    wait_until(lambda: all_up(node.stats_socket, "workers"), 10, "the restarted worker is UP again")


def test_a_draining_worker_finishes_its_request_while_others_take_new_ones(node, http):
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(response=http.request("GET", node.url + "/slow?s=4")))
    thread.start()

    def busy_worker() -> str | None:
        rows = server_stats(node.stats_socket, "workers")
        return next((name for name, row in rows.items() if row["scur"] == "1"), None)

    wait_until(lambda: busy_worker() is not None, 5, "the slow request reaches a worker")
    name = busy_worker()
    port = int(name.removeprefix("worker"))
    node.workers[port].signal(signal.SIGTERM)
    wait_until(lambda: server_stats(node.stats_socket, "workers")[name]["status"] != "UP", 5, "the draining worker is taken out")
    before = {n: int(row["stot"]) for n, row in server_stats(node.stats_socket, "workers").items()}
    for _ in range(20):
        assert http.request("GET", node.url + "/echo").status == 200
    after = {n: int(row["stot"]) for n, row in server_stats(node.stats_socket, "workers").items()}
    assert after[name] == before[name], "a new request went to the draining worker"
    assert sum(after.values()) - sum(before.values()) == 20
    thread.join(15)
    assert slow["response"].status == 200 and slow["response"].data == b"slow answer"
    assert node.workers[port].popen.wait(10) == 0
    node.start_worker(port)
    wait_until(lambda: all_up(node.stats_socket, "workers"), 10, "the restarted worker is UP again")
