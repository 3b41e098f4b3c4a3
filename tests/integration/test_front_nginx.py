"""The nginx node front (haproxy/node-nginx.conf.j2) as a real nginx in front of real workers.

With front.balancers set, nginx expects a PROXY header on every connection and believes
the address in it only from a balancer (127.0.0.2 here); an agent (127.0.0.3) that forges
one is still seen as itself.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kit import (
    AGENT, BALANCER, NGINX, Process, echo_via, free_port, free_ports, headers_of, proxy_v2_header, render,
    start_origin, start_worker, wait_for_port, write_config,
)


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nginx")
    origin, origin_url = start_origin(directory)
    ports, port = free_ports(2), free_port()
    config = write_config(directory, origin_url, listen={"host": "127.0.0.1", "port": ports[0]},
                          front={"bind": "127.0.0.1", "port": port, "workers": 2, "balancers": [f"{BALANCER}/32"]})
    workers = [start_worker(config, directory, p) for p in ports]
    conf = directory / "nginx.conf"
    conf.write_text(render("node-nginx", config, f"nginx_pid={directory / 'nginx.pid'}"))
    check = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    nginx = Process("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], directory / "nginx.log").start()
    wait_for_port("127.0.0.1", port, proc=nginx)
    yield {"port": port, "workers": workers}
    nginx.stop()
    for proc in workers + [origin]:
        proc.stop()


def test_address_from_a_balancers_proxy_header_is_believed(front):
    header = proxy_v2_header("127.0.0.9", "127.0.0.1", 40000, front["port"])
    got = headers_of(echo_via(front["port"], BALANCER, headers={"X-Forwarded-For": "10.6.6.6"}, prefix=header))
    assert got["x-agent-proxy-client-ip"] == ["127.0.0.9"]
    assert got["x-forwarded-for"] == ["127.0.0.9"]


def test_an_agent_forging_a_proxy_header_is_seen_as_itself(front):
    header = proxy_v2_header("127.0.0.9", "127.0.0.1", 40000, front["port"])
    got = headers_of(echo_via(front["port"], AGENT, headers={"X-Forwarded-For": "10.6.6.6", "Forwarded": "for=10.6.6.6"}, prefix=header))
    assert got["x-agent-proxy-client-ip"] == [AGENT]
    assert got["x-forwarded-for"] == [AGENT]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion[name] for name in ("TLSv1", "TLSv1_1", "TLSv1_2", "TLSv1_3")], ids=lambda v: v.name)
def test_only_tls_1_2_and_newer_are_accepted(front, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT@SECLEVEL=0")  # so that a refusal is nginx's, not this client's
    context.minimum_version = context.maximum_version = version
    raw = socket.create_connection(("127.0.0.1", front["port"]), timeout=10, source_address=(BALANCER, 0))
    raw.sendall(proxy_v2_header(AGENT, "127.0.0.1", 40000, front["port"]))
    with raw:
        if version >= ssl.TLSVersion.TLSv1_2:
            with context.wrap_socket(raw) as tls:
                assert tls.version() == version.name.replace("_", ".")
        else:
            with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
                context.wrap_socket(raw)


def test_a_dead_worker_is_passed_over(front):
    front["workers"][0].signal(signal.SIGKILL)
    assert front["workers"][0].popen.wait(5) == -signal.SIGKILL
    statuses = []
    for _ in range(20):
        header = proxy_v2_header(AGENT, "127.0.0.1", 40000, front["port"])
        statuses.append(echo_via(front["port"], BALANCER, prefix=header)["method"])
    assert statuses == ["GET"] * 20


def raw_via_balancer(port: int, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """``request`` over TLS as a balancer passes it (PROXY header for an agent): status line, headers, body."""
    return raw_request(port, request, BALANCER, proxy_v2_header(AGENT, "127.0.0.1", 40000, port))


def raw_request(port: int, request: bytes, source: str, prefix: bytes = b"") -> tuple[bytes, dict[str, str], bytes]:
    """``request`` over TLS from ``source``, after ``prefix``: status line, headers, body."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    raw.sendall(prefix)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(raw) as tls:
        tls.sendall(request)
        answer = b"".join(iter(lambda: tls.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return status_line.encode(), {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def test_nginxs_own_errors_are_the_contracts_json(front):
    """What nginx refuses itself, and no worker answering, in the contract's JSON and code."""
    status, headers, body = raw_via_balancer(
        front["port"], b"GET /echo HTTP/1.1\r\nHost: p\r\nHost: q\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 "), (status, body)
    assert headers["x-agent-proxy-error"] == "bad-request" and headers["content-type"] == "application/json"
    assert json.loads(body)["title"] == "Bad request"
    for worker in front["workers"]:
        worker.signal(signal.SIGKILL)
    status, headers, body = raw_via_balancer(front["port"], b"GET /echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 502 "), (status, body)
    assert headers["x-agent-proxy-error"] == "worker-failed" and json.loads(body)["title"] == "Bad gateway"


def test_a_request_past_the_per_source_limit_is_429_in_json(tmp_path):
    """nginx counts an address's connections with a request in progress: with one allowed,
    a second request while the first is slow is refused in the contract's JSON; the
    limit holds per address, and frees up when the first is answered."""
    origin, origin_url = start_origin(tmp_path)
    worker_port, port = free_port(), free_port()
    config = write_config(tmp_path, origin_url, listen={"host": "127.0.0.1", "port": worker_port},
                          front={"bind": "127.0.0.1", "port": port, "workers": 1, "max_conn_per_source": 1})
    worker = start_worker(config, tmp_path, worker_port)
    conf = tmp_path / "nginx.conf"
    conf.write_text(render("node-nginx", config, f"nginx_pid={tmp_path / 'nginx.pid'}"))
    nginx = Process("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log").start()
    try:
        wait_for_port("127.0.0.1", port, proc=nginx)

        def get(source: str, path: str) -> tuple[bytes, dict[str, str], bytes]:
            return raw_request(port, f"GET {path} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode(), source)

        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(get, AGENT, "/slow?s=3")
            time.sleep(1)  # the slow request is in progress at the worker
            status, headers, body = get(AGENT, "/echo/second")
            assert status.startswith(b"HTTP/1.1 429 "), (status, body)
            assert headers["x-agent-proxy-error"] == "too-many-connections" and headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"title": "Too many connections", "description": "more than 1 connections from this address"}
            assert get(BALANCER, "/echo/other-address")[0].startswith(b"HTTP/1.1 200 ")
            assert slow.result(timeout=15)[0].startswith(b"HTTP/1.1 200 ")
        assert get(AGENT, "/echo/after")[0].startswith(b"HTTP/1.1 200 ")
    finally:
        nginx.stop()
        worker.stop()
        origin.stop()
