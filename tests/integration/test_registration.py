"""`agent-proxy register` and `deregister`, as a user runs them.

Real processes on loopback: the reference control plane (HTTPS, self-signed), a real
`agent-proxy serve` worker (plain HTTP; its public_url is where the upstream calls back
for the handshake), and the real CLI. Each failure test asserts the line the user reads.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml

from kit import AGENT_PROXY, free_port, start_upstream, start_worker, write_config


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    proc, url, ca = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield {"url": url, "ca": ca, "proc": proc}
    proc.stop()


@pytest.fixture(scope="module")
def worker(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    config = write_config(tmp, upstream["url"], upstream={"ca_file": upstream["ca"]})
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    proc = start_worker(config, tmp)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def config_for(tmp_path: Path, peer: dict, public_url: str | None, url: str | None = None, ca_file: str | None = "peer") -> Path:
    """A proxy config for registering with ``peer`` (the reference upstream) at ``url``."""
    return write_config(tmp_path, url or peer["url"], public_url=public_url,
                        upstream={"ca_file": peer["ca"] if ca_file == "peer" else ca_file})


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT_PROXY, *args], capture_output=True, text=True, timeout=30)


def registered(upstream: dict) -> list:
    context = ssl.create_default_context(cafile=upstream["ca"])
    conn = http.client.HTTPSConnection("127.0.0.1", int(upstream["url"].rsplit(":", 1)[1]), context=context, timeout=5)
    try:
        conn.request("GET", "/operator/v1/proxies")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_register_twice_then_deregister_twice(upstream, worker, tmp_path):
    config = str(config_for(tmp_path, upstream, worker))
    first = cli("register", "-c", config)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"site-a registered with {upstream['url']}; the upstream reached this proxy at {worker} "
        "(features: northbound, southbound, registration, metrics)"
    )
    assert [(p["proxy_id"], p["url"]) for p in registered(upstream)] == [("site-a", worker)]

    second = cli("register", "-c", config)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"site-a was already registered (refreshed) with {upstream['url']};")
    assert len(registered(upstream)) == 1

    gone = cli("deregister", "-c", config)
    assert (gone.returncode, gone.stdout.strip()) == (0, f"site-a deregistered from {upstream['url']}")
    assert registered(upstream) == []
    again = cli("deregister", "-c", config)
    assert (again.returncode, again.stdout.strip()) == (0, f"site-a was not registered with {upstream['url']}; nothing to do")


def test_upstream_unreachable(upstream, worker, tmp_path):
    url = f"https://127.0.0.1:{free_port()}"
    result = cli("register", "-c", str(config_for(tmp_path, upstream, worker, url=url)))
    assert (result.returncode, result.stderr.strip()) == (1, f"agent-proxy: cannot reach the upstream {url}: Connection refused")


def test_upstream_certificate_not_trusted(upstream, worker, tmp_path):
    config = config_for(tmp_path, upstream, worker, ca_file=None)
    result = cli("register", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"agent-proxy: TLS with the upstream {upstream['url']} failed: certificate verify failed: self-signed certificate "
        "(upstream.ca_file: system CAs)"
    )


def test_signature_refused(upstream, worker, tmp_path):
    config = config_for(tmp_path, upstream, worker)
    (tmp_path / "psk").write_text("a-secret-the-upstream-does-not-hold\n")
    result = cli("register", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"agent-proxy: the upstream {upstream['url']} refused this proxy's signature: signature does not match "
        "(check that it holds the shared secret of proxy_id site-a)"
    )
    assert registered(upstream) == []


def test_proxy_not_reachable_from_the_upstream(upstream, tmp_path):
    public_url = f"http://127.0.0.1:{free_port()}"  # no worker there
    result = cli("register", "-c", str(config_for(tmp_path, upstream, public_url)))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"agent-proxy: the upstream {upstream['url']} could not complete the handshake with this proxy "
        f"(public_url {public_url}): cannot reach {public_url}: Connection refused"
    )
    assert registered(upstream) == []


def test_proxy_certificate_not_trusted_by_the_upstream(upstream, tmp_path):
    # public_url is an HTTPS server whose certificate the upstream was not given (--proxy-ca).
    public_url = upstream["url"]
    result = cli("register", "-c", str(config_for(tmp_path, upstream, public_url)))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"agent-proxy: the upstream {upstream['url']} could not complete the handshake with this proxy "
        f"(public_url {public_url}): TLS with {public_url} failed: certificate verify failed: self-signed certificate"
    )


def test_other_status_names_status_and_title(upstream, worker, tmp_path):
    url = upstream["url"] + "/control"  # a path the upstream does not serve
    result = cli("register", "-c", str(config_for(tmp_path, upstream, worker, url=url)))
    assert (result.returncode, result.stderr.strip()) == (1, f"agent-proxy: the upstream {url} answered 404: 404 Not Found")


def test_register_without_public_url(upstream, tmp_path):
    config = config_for(tmp_path, upstream, None)
    result = cli("register", "-c", str(config))
    assert (result.returncode, result.stderr.strip()) == (
        2, f"agent-proxy: {config}: public_url: not set; the upstream needs it to reach this proxy",
    )


def test_ca_file_without_a_certificate(upstream, worker, tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    config = config_for(tmp_path, upstream, worker, ca_file=str(empty))
    result = cli("register", "-c", str(config))
    assert (result.returncode, result.stderr.strip()) == (
        2, f"agent-proxy: {config}: upstream.ca_file: cannot load {empty} as CA certificates: NO_CERTIFICATE_OR_CRL_FOUND",
    )


def test_register_warns_about_features_the_upstream_expects_and_the_proxy_lacks(tmp_path):
    peer, url, ca = start_upstream(tmp_path, "--expect-feature", "southbound", "--expect-feature", "dhcp")
    try:
        up = {"url": url, "ca": ca}
        node = tmp_path / "node"
        listen = free_port()
        config = write_config(node, up["url"], upstream={"ca_file": up["ca"]}, agents={"ports": []},
                              listen={"host": "127.0.0.1", "port": listen}, public_url=f"http://127.0.0.1:{listen}")
        proc = start_worker(config, node)  # starts, with southbound failed
        try:
            done = cli("register", "-c", str(config))
        finally:
            proc.stop()
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines() == [
            "agent-proxy: warning: the upstream expects feature dhcp, which this proxy does not offer",
            "agent-proxy: warning: the upstream expects feature southbound, which is failed here: "
            "agents.ports: at least one agent port is required",
        ]
        [record] = registered(up)
        assert record["feature_states"]["southbound"]["state"] == "failed"
        assert record["expected_features"] == ["southbound", "dhcp"]
    finally:
        peer.stop()


def test_a_reload_that_changes_the_features_refreshes_the_registration(upstream, tmp_path):
    import signal
    import time

    listen = free_port()
    public = {"host": "127.0.0.1", "port": listen}
    config = write_config(tmp_path, upstream["url"], upstream={"ca_file": upstream["ca"]}, listen=public,
                          public_url=f"http://127.0.0.1:{listen}")
    proc = start_worker(config, tmp_path)
    try:
        assert cli("register", "-c", str(config)).returncode == 0
        write_config(tmp_path, upstream["url"], upstream={"ca_file": upstream["ca"]}, listen=public,
                     public_url=f"http://127.0.0.1:{listen}", agents={"ports": [2003, 2005]})
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            [record] = [r for r in registered(upstream) if r["proxy_id"] == "site-a"]
            if "agent-port-2005" in record["feature_states"]["southbound"]["capabilities"]:
                break
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.2)
        assert "registration refreshed: site-a was already registered (refreshed)" in proc.output()
    finally:
        proc.stop()
        cli("deregister", "-c", str(config))
