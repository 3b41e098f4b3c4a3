"""Endpoints: every worker answers health and ready, and reports all its features running
to a signed upstream request (on its control listener with listen_control); the front
answers health over TLS, and with listen_control refuses the upstream's paths on the
client port even when signed. The requests run on the host: curl, or python3 where curl
is missing (a minimal image)."""

from __future__ import annotations

import ipaddress
import json
import shlex

import pytest

from agent_proxy import signing

FEATURES_PATH = "/_proxy/v2/features"


# Where the host has no curl (a minimal image), the same request with its python3.
PYTHON_GET = """
import ssl, sys, urllib.error, urllib.request
insecure, timeout, url = sys.argv[1] == "-k", float(sys.argv[2]), sys.argv[3]
headers = dict(h.split(": ", 1) for h in sys.argv[4:])
context = ssl._create_unverified_context() if insecure else None
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=context) as answer:
        status, body = answer.status, answer.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
sys.stdout.write(body.decode("utf-8", "replace") + "\\n" + str(status))
"""


def http_get(node, url: str, *headers: str, insecure: bool = False) -> tuple[int, str]:
    """(status, body) of a GET run on the node's host (curl, else python3), within --ap-probe-timeout."""
    host, timeout = node.host, f"{node.probe_timeout:g}"
    if host.exists("curl"):
        argv = ["curl", "-sS", "--max-time", timeout, "-w", "\\n%{http_code}"] + (["-k"] if insecure else [])
        for header in headers:
            argv += ["-H", header]
        argv.append(url)
    else:
        argv = ["python3", "-c", PYTHON_GET, "-k" if insecure else "-", timeout, url, *headers]
    result = host.run(" ".join(shlex.quote(a) for a in argv))
    body, _, status = result.stdout.rpartition("\n")
    assert result.rc == 0, f"GET {url} on the host failed: {result.stderr.strip()[-300:]}"
    return int(status or 0), body


def worker_url(node, port: int, path: str) -> str:
    return f"http://{node.config.listen.host}:{port}{path}"


def test_AP_EP_01_health(host, node, control, worker_port):
    status, body = http_get(node, worker_url(node, worker_port, "/_proxy/health"))
    assert status == 200, f"/_proxy/health on {worker_port} answered {status}: {body[:200]}"
    control.note(f"200 {body.strip()[:60]}")


def test_AP_EP_02_ready(host, node, control, worker_port):
    status, body = http_get(node, worker_url(node, worker_port, "/_proxy/ready"))
    assert status == 200, f"/_proxy/ready on {worker_port} answered {status}: {body[:200]}"
    control.note(f"200 {body.strip()[:60]}")


def upstream_source_headers(node) -> list[str]:
    """How a request from the host itself passes the networks.upstream source check.

    Loopback is the front (trusted_proxies), so the worker believes its X-Forwarded-For:
    the request then comes, as the front would say, from an upstream address.
    """
    config = node.config
    networks = config.networks.upstream
    loopback = "127.0.0.1" if ":" not in config.listen.host else "::1"
    if not networks or any(ipaddress.ip_address(loopback) in n for n in networks):
        return []
    if loopback not in {str(a) for a in config.trusted_proxies}:
        return []  # the worker will refuse the host itself: the control fails and says why
    return [f"X-Forwarded-For: {next(iter(networks[0].hosts()), networks[0].network_address)}"]


def signed_features(node) -> str:
    config = node.config
    return f"Authorization: {signing.authorization(node.read_secret(), config.proxy_id, 'GET', FEATURES_PATH)}"


def test_AP_EP_03_features_running(host, node, control, worker_port):
    # With listen_control the upstream's paths are on the worker's control listener.
    port = node.config.control_port_of(worker_port) or worker_port
    status, body = http_get(node, worker_url(node, port, FEATURES_PATH), signed_features(node),
                            *upstream_source_headers(node))
    assert status == 200, f"signed {FEATURES_PATH} on {port} answered {status}: {body[:200]}"
    features = json.loads(body)
    not_running = {name: f.get("state") for name, f in features.items() if f.get("state") != "running"}
    assert features and not not_running, f"features not running: {not_running or 'none reported'}"
    control.note(f"running: {', '.join(sorted(features))}" + (f" (control listener {port})" if port != worker_port else ""))


def test_AP_EP_04_front_health(host, node, control):
    status, body = http_get(node, node.front_url("/_proxy/health"), insecure=True)
    assert status == 200, f"/_proxy/health through the front answered {status}: {body[:200]}"
    control.note(f"200 through {node.front_url('')}")


def test_AP_EP_05_control_paths_refused_on_the_client_port(host, node, control):
    """With listen_control, an agent holding a valid signature still cannot call the
    upstream's paths through front.port: the workers answer them on their control listener only."""
    if node.config.listen_control is None:
        pytest.skip("listen_control is not set: the upstream's paths share front.port")
    status, body = http_get(node, node.front_url(FEATURES_PATH), signed_features(node), insecure=True)
    assert status == 404, f"signed {FEATURES_PATH} through the client port {node.front_target} answered {status}: {body[:200]}"
    control.note(f"signed {FEATURES_PATH} through {node.front_target}: 404")
