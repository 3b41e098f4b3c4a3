"""Southbound success: a signed upstream request reaches an agent living in a namespace.

Loopback targets are always refused, so the agent gets its own namespace (10.0.0.2, TLS
on :2003) joined by a veth pair to the worker's namespace (10.0.0.1); curl runs inside
the worker's namespace. Nothing is added to the root namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent_proxy import signing
from agent_proxy.tlsutil import self_signed
from kit import REPO, SECRET, Process, netns, start_worker, wait_for_port, write_config

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    tmp = tmp_path_factory.mktemp("southbound")
    proxy_ns, agent_ns = f"apt-sb-{os.getpid()}-p", f"apt-sb-{os.getpid()}-a"
    procs: list[Process] = []
    try:
        netns.add(proxy_ns)
        netns.add(agent_ns)
        netns.link(proxy_ns, "agents0", "10.0.0.1/24", agent_ns, "eth0", "10.0.0.2/24")
        cert, key = self_signed("agent", ["10.0.0.2"])
        (tmp / "agent.crt").write_bytes(cert)
        (tmp / "agent.key").write_bytes(key)
        agent = Process("agent", [sys.executable, "-m", "tests.origin", "10.0.0.2:2003", "--tls", str(tmp / "agent.crt"), str(tmp / "agent.key")],
                        tmp / "agent.log", env={"PYTHONPATH": f"{REPO}:{REPO / 'app'}"}, netns=agent_ns).start()
        procs.append(agent)
        wait_for_port("10.0.0.2", 2003, proc=agent)
        config = write_config(
            tmp, "http://127.0.0.1:9",
            listen={"host": "127.0.0.1", "port": 8002},
            networks={"agents": ["10.0.0.0/24"], "upstream": ["127.0.0.0/8"]},
            agents={"ports": [2003], "tls": True, "verify": False},
        )
        procs.append(start_worker(config, tmp, netns=proxy_ns))
        yield proxy_ns
    finally:
        for proc in procs:
            proc.stop()
        netns.delete(proxy_ns)
        netns.delete(agent_ns)


def southbound(proxy_ns: str, method: str, path: str, auth: str | None, *extra: str) -> tuple[int, dict, bytes]:
    argv = netns.prefix(proxy_ns) + ["curl", "-sS", "--max-time", "10", "-X", method, "-D", "-", f"http://127.0.0.1:8002{path}"]
    if auth:
        argv += ["-H", f"Authorization: {auth}"]
    out = subprocess.run(argv + list(extra), capture_output=True, timeout=30, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (l.partition(": ") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_signed_request_reaches_the_agent_with_authorization_consumed(site):
    path = "/_proxy/agents/10.0.0.2/2003/agent/v1/commands/job%2F7?run=%2Fecho"
    auth = signing.authorization(SECRET.encode(), "site-a", "POST", path)
    status, headers, body = southbound(site, "POST", path, auth, "-H", "Content-Type: application/json", "--data", '{"command":"echo"}')
    assert status == 200, body
    seen = json.loads(body)
    assert seen["target"] == "/agent/v1/commands/job%2F7?run=%2Fecho"
    assert seen["method"] == "POST" and seen["body_size"] == len('{"command":"echo"}')
    names = {name.lower() for name, _ in seen["headers"]}
    assert "authorization" not in names and "x-request-id" in names
    assert "x-agent-proxy-error" not in headers
    assert [value for name, value in seen["headers"] if name.lower() == "via"] == ["1.1 agent-proxy"]
    assert headers["via"] == "1.1 agent-proxy"


def test_agent_port_outside_agents_ports_is_refused(site):
    path = "/_proxy/agents/10.0.0.2/22/"
    status, headers, _ = southbound(site, "GET", path, signing.authorization(SECRET.encode(), "site-a", "GET", path))
    assert status == 403 and headers["x-agent-proxy-error"] == "target-not-allowed"


def test_unreachable_agent_is_502(site):
    path = "/_proxy/agents/10.0.0.9/2003/"
    status, headers, _ = southbound(site, "GET", path, signing.authorization(SECRET.encode(), "site-a", "GET", path))
    assert status in (502, 504) and headers["x-agent-proxy-error"] in ("agent-unreachable", "agent-timeout")


def test_unsigned_request_never_reaches_the_agent(site):
    status, headers, _ = southbound(site, "GET", "/_proxy/agents/10.0.0.2/2003/", None)
    assert status == 401 and headers["x-agent-proxy-error"] == "bad-signature"


def test_max_forwards_counts_down_to_the_agent_and_ends_at_the_proxy(site):
    """RFC 9110 7.6.2, southbound too: an OPTIONS reaches the agent with Max-Forwards one
    less; at 0 the proxy answers it itself, and a TRACE at 0 is 405."""
    path = "/_proxy/agents/10.0.0.2/2003/agent/v1/status"
    auth = signing.authorization(SECRET.encode(), "site-a", "OPTIONS", path)
    status, _, body = southbound(site, "OPTIONS", path, auth, "-H", "Max-Forwards: 3")
    assert status == 200, body
    assert [value for name, value in json.loads(body)["headers"] if name.lower() == "max-forwards"] == ["2"]
    status, headers, body = southbound(site, "OPTIONS", path, auth, "-H", "Max-Forwards: 0")
    assert status == 200 and body == b"" and headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    trace = signing.authorization(SECRET.encode(), "site-a", "TRACE", path)
    status, headers, _ = southbound(site, "TRACE", path, trace, "-H", "Max-Forwards: 0")
    assert status == 405 and headers["x-agent-proxy-error"] == "method-not-allowed"
