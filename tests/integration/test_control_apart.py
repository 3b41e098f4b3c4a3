"""Control traffic apart, end to end: with listen_control, the node front (real HAProxy or
nginx, rendered from the templates) carries the upstream's paths on front.control_port only.

Loopback addresses play the parts: 127.0.0.3 an agent, 127.0.0.5 the upstream
(networks.upstream), and 127.0.0.1 the front itself (trusted_proxies).
"""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
from dataclasses import dataclass

import pytest
import yaml

from agent_proxy import signing
from kit import (
    AGENT, AGENT_PROXY, NGINX, SECRET, Process, all_up, free_port, free_ports, node_with_origin, render, server_stats,
    start_haproxy, start_origin, start_worker, wait_for_port, wait_until, write_config,
)

UPSTREAM = "127.0.0.5"


CONTROL = {"networks": {"agents": ["127.0.0.0/8"], "upstream": [f"{UPSTREAM}/32"]}}


@dataclass
class Front:
    port: int
    control_port: int
    kind: str
    worker_ports: list[int]
    stats_socket: str = ""  # HAProxy's runtime API (the haproxy front only)


@pytest.fixture(scope="module", params=["haproxy", "nginx"])
def node(request, tmp_path_factory):
    control_ports, control_port = free_ports(2), free_port()
    control = {**CONTROL, "listen_control": {"host": "127.0.0.1", "port": control_ports[0]}}
    if request.param == "haproxy":
        with node_with_origin(tmp_path_factory, front={"control_port": control_port}, **control) as node:
            wait_until(lambda: all_up(node.stats_socket, "control_workers"), 10, "control workers UP in HAProxy")
            yield Front(node.port, control_port, "haproxy", list(node.workers), node.stats_socket)
        return
    directory = tmp_path_factory.mktemp("nginx")
    origin, origin_url = start_origin(directory)
    ports, port = free_ports(2), free_port()
    config = write_config(directory, origin_url, listen={"host": "127.0.0.1", "port": ports[0]},
                          front={"bind": "127.0.0.1", "port": port, "workers": 2, "control_port": control_port}, **control)
    started = [origin] + [start_worker(config, directory, p) for p in ports]
    try:
        conf = directory / "nginx.conf"
        conf.write_text(render("node-nginx", config, f"nginx_pid={directory / 'nginx.pid'}"))
        started.append(Process("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], directory / "nginx.log").start())
        wait_for_port("127.0.0.1", control_port, proc=started[-1])
        yield Front(port, control_port, "nginx", ports)
    finally:
        for proc in reversed(started):
            proc.stop()


def call(port: int, source: str, method: str, path: str, signed: bool = False) -> tuple[int, str, bytes]:
    """One request over TLS from ``source``; (status, X-Agent-Proxy-Error, body)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10, source_address=(source, 0))
    headers = {"Authorization": signing.authorization(SECRET.encode(), "site-a", method, path)} if signed else {}
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers.get("X-Agent-Proxy-Error", ""), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/_proxy/v2/features", "/_proxy/metrics", "/_proxy/agents/127.0.0.9/2003/x"])
def test_agents_on_the_client_port_cannot_reach_control_paths_even_signed(node, path):
    status, code, body = call(node.port, AGENT, "GET", path, signed=True)
    assert (status, code) == (404, "not-found"), body


def test_the_upstream_reaches_control_paths_on_the_control_port(node):
    status, _, body = call(node.control_port, UPSTREAM, "GET", "/_proxy/v2/features", signed=True)
    assert status == 200 and b'"northbound"' in body
    status, _, body = call(node.control_port, UPSTREAM, "GET", "/_proxy/metrics")
    assert status == 200 and b"agent_proxy_workers_scraped 2.0" in body
    # Each worker is named by its port on listen.port (not the control port it was asked on).
    workers = set(re.findall(rb'process_open_fds\{worker="(\d+)"\}', body))
    assert workers == {str(p).encode() for p in node.worker_ports}


def test_a_worker_drained_by_name_leaves_both_backends_and_both_listeners_still_answer(node):
    """`agent-proxy lb drain --server worker<port>` (no backend named), as restart-workers
    drains a worker before restarting it: the worker is out of `workers` and of
    `control_workers`, so neither an agent's call nor the upstream's reaches it."""
    if node.kind != "haproxy":
        pytest.skip("the runtime API is HAProxy's")
    drained, serving = (f"worker{port}" for port in sorted(node.worker_ports))
    backends = ("workers", "control_workers")

    def lb(action: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([AGENT_PROXY, "lb", action, "--socket", node.stats_socket, "--server", drained, *extra],
                              capture_output=True, text=True, timeout=30)

    def sessions(server: str) -> dict[str, int]:
        return {backend: int(server_stats(node.stats_socket, backend)[server]["stot"]) for backend in backends}

    done = lb("drain")
    try:
        assert done.returncode == 0, done.stderr
        assert [line.split(", ")[0] for line in done.stdout.splitlines()] == [f"{b}/{drained}: DRAIN" for b in backends]
        assert {b: server_stats(node.stats_socket, b)[drained]["status"] for b in backends} == dict.fromkeys(backends, "DRAIN")
        before, before_serving = sessions(drained), sessions(serving)
        for _ in range(4):
            assert call(node.port, AGENT, "GET", "/echo")[0] == 200
            assert call(node.control_port, UPSTREAM, "GET", "/_proxy/v2/features", signed=True)[0] == 200
        assert sessions(drained) == before
        assert all(after > before_serving[b] for b, after in sessions(serving).items())
    finally:
        back = lb("ready", "--timeout", "10")
        assert back.returncode == 0, back.stderr


def test_the_control_port_refuses_agent_traffic_and_other_sources(node):
    status, code, _ = call(node.control_port, UPSTREAM, "GET", "/echo")
    assert (status, code) == (404, "not-found")
    if node.kind == "haproxy":  # HAProxy drops the connection before TLS
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call(node.control_port, AGENT, "GET", "/_proxy/v2/features", signed=True)
    else:  # nginx decides per request: its own 403 (the contract's JSON), without asking a worker
        status, code, _ = call(node.control_port, AGENT, "GET", "/_proxy/v2/features", signed=True)
        assert (status, code) == (403, "source-not-allowed")


def test_agents_still_reach_the_upstream_on_the_client_port(node):
    status, _, body = call(node.port, AGENT, "GET", "/echo")
    assert status == 200 and b'"/echo"' in body


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    """A node behind a real balancer (haproxy/lb-haproxy.cfg.j2), both with listen_control."""
    control_ports, control_port = free_ports(2), free_port()
    with node_with_origin(tmp_path_factory, balancers=["127.0.0.1/32"], front={"control_port": control_port},
                          listen_control={"host": "127.0.0.1", "port": control_ports[0]}, **CONTROL) as node:
        directory = tmp_path_factory.mktemp("balancer")
        port, lb_control_port = free_port(), free_port()
        config = write_config(directory, "http://127.0.0.1:9", listen_control={"host": "127.0.0.1", "port": free_port()},
                              front={"bind": "127.0.0.1", "port": port, "control_port": lb_control_port,
                                     "stats_socket": str(directory / "haproxy.sock")}, **CONTROL)
        (directory / "nodes.yaml").write_text(yaml.safe_dump({"nodes": [
            {"name": "node1", "address": "127.0.0.1", "port": node.port, "control_port": control_port}]}))
        balancer = start_haproxy(render("lb-haproxy", config, str(directory / "nodes.yaml"), f"monitor_port={free_port()}", "log_format=raw"),
                                 directory, "balancer")
        try:
            wait_until(lambda: all_up(str(directory / "haproxy.sock"), "control_nodes"), 10, "node1 UP in control_nodes")
            yield Front(port, lb_control_port, "balancer", list(node.workers))
        finally:
            balancer.stop()


def test_through_a_balancer_the_upstream_reaches_control_paths_and_agents_do_not(balanced):
    status, _, body = call(balanced.control_port, UPSTREAM, "GET", "/_proxy/v2/features", signed=True)
    assert status == 200 and b'"control-listener"' in body
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(balanced.control_port, AGENT, "GET", "/_proxy/v2/features", signed=True)
    status, code, _ = call(balanced.port, AGENT, "GET", "/_proxy/v2/features", signed=True)
    assert (status, code) == (404, "not-found")
    status, _, _ = call(balanced.port, AGENT, "GET", "/echo")
    assert status == 200
