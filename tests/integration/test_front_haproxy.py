"""The node front (haproxy/node-haproxy.cfg.j2) as a real HAProxy in front of real workers.

Everything runs on loopback: an origin standing in for the upstream (``python -m
tests.origin``, whose /echo answer says what it received), two `agent-proxy serve`
workers, and HAProxy with the rendered configuration. Loopback addresses other than
127.0.0.1 play the parts of a balancer (127.0.0.2) and of agents (127.0.0.3 and up):
Linux routes all of 127/8 to lo, so a client socket bound to one of them is seen from it.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading

import pytest
import urllib3

from agent_proxy import signing
from agent_proxy.tlsutil import fingerprint
from kit import (
    AGENT, BALANCER, LIMITED_AGENT, MAX_CONN_PER_SOURCE, SECRET, all_up, echo_via, headers_of,
    proxy_v2_header, run_load, server_stats, start_node, start_origin, stats_command, wait_until,
)


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
    assert got["forwarded"] == [f'for="{AGENT}";by="site-a"']
    assert "x-real-ip" not in got
    signing.verify_signature_header(got["x-agent-proxy-signature"][0], SECRET.encode(), "site-a", "GET", "/echo", AGENT)


def test_front_log_has_the_path_without_query_and_no_health_checks(node, http):
    secret_query = "token=front-log-secret"
    answer = http.request("GET", f"{node.url}/echo/front-log?{secret_query}")
    assert answer.status == 200
    assert http.request("GET", f"{node.url}/_proxy/health").status == 200
    log = node.haproxy.log_path
    wait_until(lambda: "/echo/front-log " in log.read_text(), 5, "the request's line in the front's log")
    text = log.read_text()
    assert '"GET /echo/front-log HTTP/1.1"' in text
    assert secret_query not in text
    assert "/_proxy/health" not in text


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
    # "UP 1/2" is a worker going down that still takes requests: wait until it is out.
    wait_until(lambda: server_stats(node.stats_socket, "workers")[name]["status"] == "DOWN", 5, "the draining worker is taken out")
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


# -- the front's own answers


def assert_front_error(response, status: int, code: str, title: str) -> dict:
    """``response`` is an error the front made itself, in the contract's shape (errors.py)."""
    assert response.status == status, response.data
    assert response.headers["X-Agent-Proxy-Error"] == code
    assert response.headers["Content-Type"] == "application/json"
    body = json.loads(response.data)
    assert body["title"] == title
    return body


def test_a_worker_that_stops_answering_is_the_fronts_504(origin, tmp_path):
    # Upstream timeouts of 1 s: the front gives up on a worker after 1 + 1 + 15 s.
    node = start_node(tmp_path, origin, workers=1, upstream={"connect_timeout": 1, "read_timeout": 1})
    http = urllib3.PoolManager(retries=False, ca_certs=str(node.cert), timeout=urllib3.Timeout(connect=5, read=40))
    (worker,) = node.workers.values()
    try:
        # A worker's own error passes through as it is (the upstream did not answer in 1 s).
        assert_front_error(http.request("GET", node.url + "/slow?s=3"), 504, "upstream-timeout", "Gateway timeout")
        stopped = {}
        thread = threading.Thread(target=lambda: stopped.update(response=http.request("GET", node.url + "/echo/stopped")))
        worker.signal(signal.SIGSTOP)
        thread.start()
        thread.join(30)
        worker.signal(signal.SIGCONT)
        body = assert_front_error(stopped["response"], 504, "worker-timeout", "Gateway timeout")
        assert body["description"] == "a worker did not answer within 17 s"
    finally:
        node.stop()


def test_a_dead_worker_is_the_fronts_502_then_503_until_one_is_back(origin, tmp_path):
    node = start_node(tmp_path, origin, workers=1)
    http = urllib3.PoolManager(retries=False, ca_certs=str(node.cert), timeout=urllib3.Timeout(connect=5, read=20))
    (port, worker), = node.workers.items()
    server = f"worker{port}"
    try:
        # The worker dies holding a POST, which is never sent twice: 502.
        posted = {}
        thread = threading.Thread(target=lambda: posted.update(response=http.request("POST", node.url + "/slow?s=5", body=b"x")))
        thread.start()
        wait_until(lambda: server_stats(node.stats_socket, "workers")[server]["scur"] == "1", 5, "the POST reaches the worker")
        worker.signal(signal.SIGKILL)
        thread.join(10)
        assert_front_error(posted["response"], 502, "worker-failed", "Bad gateway")
        # No worker up at all: 503, come back in a second.
        wait_until(lambda: server_stats(node.stats_socket, "workers")[server]["status"] == "DOWN", 5, "the dead worker is DOWN")
        response = http.request("GET", node.url + "/echo")
        assert_front_error(response, 503, "no-worker", "Unavailable")
        assert response.headers["Retry-After"] == "1"
        node.start_worker(port)
        wait_until(lambda: all_up(node.stats_socket, "workers"), 10, "the restarted worker is UP")
        assert http.request("GET", node.url + "/echo").status == 200
    finally:
        node.stop()
