"""Upstream TLS: verification on by default, ca_file, and a client certificate."""

from __future__ import annotations

import hashlib
import json

import pytest
import urllib3
import yaml

from agent_proxy.tlsutil import self_signed
from kit import start_worker, write_config
from tests.origin import Origin


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    for name, host in (("origin", "127.0.0.1"), ("client", "site-a")):
        cert, key = self_signed(host, [host])
        (tmp / f"{name}.crt").write_bytes(cert)
        (tmp / f"{name}.key").write_bytes(key)
    return tmp


def relay_once(tmp_path, upstream: dict) -> urllib3.BaseHTTPResponse:
    config = write_config(tmp_path, upstream["url"], upstream=upstream)
    proc = start_worker(config, tmp_path)
    try:
        port = yaml.safe_load(config.read_text())["listen"]["port"]
        return urllib3.request("GET", f"http://127.0.0.1:{port}/echo", retries=False, timeout=10)
    finally:
        proc.stop()


def test_verified_with_ca_file_and_client_certificate(pki, tmp_path):
    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key")), client_ca=str(pki / "client.crt")).start()
    try:
        response = relay_once(tmp_path, {
            "url": origin.url, "ca_file": str(pki / "origin.crt"),
            "client_cert": str(pki / "client.crt"), "client_key": str(pki / "client.key"),
        })
        assert response.status == 200 and json.loads(response.data)["target"] == "/echo"
    finally:
        origin.stop()


def test_a_large_upload_goes_whole_over_tls(pki, tmp_path):
    """A streamed body over TLS 1.3: the session tickets the origin sends after the
    handshake arrive while the body is sent, and are no answer that stops it."""
    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key"))).start()
    body = bytes(range(256)) * 12_000   # 3 MB, over what a worker reads whole
    config = write_config(tmp_path, origin.url, upstream={"url": origin.url, "ca_file": str(pki / "origin.crt")})
    proc = start_worker(config, tmp_path)
    try:
        port = yaml.safe_load(config.read_text())["listen"]["port"]
        response = urllib3.request("POST", f"http://127.0.0.1:{port}/echo", body=body, retries=False, timeout=30)
        seen = json.loads(response.data)
        assert (response.status, seen["body_size"], seen["body_sha256"]) == (200, len(body), hashlib.sha256(body).hexdigest())
    finally:
        proc.stop()
        origin.stop()

def test_unverifiable_upstream_is_a_502_naming_tls(pki, tmp_path):
    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key"))).start()
    try:
        response = relay_once(tmp_path, {"url": origin.url})  # system CAs do not know the origin
        assert response.status == 502 and response.headers["X-Agent-Proxy-Error"] == "upstream-unreachable"
        assert "TLS with 127.0.0.1" in json.loads(response.data)["description"]
        assert origin.received == []
    finally:
        origin.stop()


def test_an_untrusted_upstream_certificate_fails_northbound_and_ready_says_why(pki, tmp_path):
    from agent_proxy import signing
    from kit import SECRET

    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key"))).start()
    config = write_config(tmp_path, origin.url)  # system CAs do not know the origin
    proc = start_worker(config, tmp_path)
    try:
        url = f"http://127.0.0.1:{yaml.safe_load(config.read_text())['listen']['port']}"
        ready = urllib3.request("GET", url + "/_proxy/ready", retries=False, timeout=10)
        reason = json.loads(ready.data)["failed"]["northbound"]
        assert ready.status == 503 and reason.startswith("the upstream's certificate is not trusted: ")
        assert "(upstream.ca_file: system CAs)" in reason
        auth = signing.authorization(SECRET.encode(), "site-a", "GET", "/_proxy/v2/features")
        v2 = json.loads(urllib3.request("GET", url + "/_proxy/v2/features", headers={"Authorization": auth}, retries=False, timeout=10).data)
        assert v2["northbound"]["state"] == "failed" and v2["northbound"]["reason"] == reason
        assert v2["southbound"]["state"] == "running"
        # Trusting the origin's certificate and reloading makes northbound run again.
        import signal
        import time

        write_config(tmp_path, origin.url, upstream={"ca_file": str(pki / "origin.crt")},
                     listen=yaml.safe_load(config.read_text())["listen"])
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while urllib3.request("GET", url + "/_proxy/ready", retries=False, timeout=10).status != 200:
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        v2 = json.loads(urllib3.request("GET", url + "/_proxy/v2/features", headers={"Authorization": auth}, retries=False, timeout=10).data)
        assert v2["northbound"]["state"] == "running"
    finally:
        proc.stop()
        origin.stop()


def test_a_worker_starts_with_an_unreadable_ca_file_and_a_reload_repairs_it(pki, tmp_path):
    import shutil
    import signal
    import time

    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key"))).start()
    ca_file = tmp_path / "upstream-ca.pem"  # not there yet
    config = write_config(tmp_path, origin.url, upstream={"ca_file": str(ca_file)})
    proc = start_worker(config, tmp_path)
    try:
        url = f"http://127.0.0.1:{yaml.safe_load(config.read_text())['listen']['port']}"
        ready = urllib3.request("GET", url + "/_proxy/ready", retries=False, timeout=10)
        assert ready.status == 503
        assert json.loads(ready.data)["failed"] == {"northbound": f"upstream.ca_file: cannot read file {ca_file}"}
        relayed = urllib3.request("GET", url + "/echo", retries=False, timeout=10)
        assert relayed.status == 503 and relayed.headers["X-Agent-Proxy-Error"] == "feature-failed"
        assert f"feature northbound failed: upstream.ca_file: cannot read file {ca_file}" in proc.output()
        shutil.copy(pki / "origin.crt", ca_file)
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while urllib3.request("GET", url + "/_proxy/ready", retries=False, timeout=10).status != 200:
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        assert urllib3.request("GET", url + "/echo", retries=False, timeout=10).status == 200
    finally:
        proc.stop()
        origin.stop()
