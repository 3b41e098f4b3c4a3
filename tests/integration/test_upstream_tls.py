"""Upstream TLS: verification on by default, ca_file, and a client certificate."""

from __future__ import annotations

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


def test_unverifiable_upstream_is_a_502_naming_tls(pki, tmp_path):
    origin = Origin(tls=(str(pki / "origin.crt"), str(pki / "origin.key"))).start()
    try:
        response = relay_once(tmp_path, {"url": origin.url})  # system CAs do not know the origin
        assert response.status == 502 and response.headers["X-Agent-Proxy-Error"] == "upstream-unreachable"
        assert "TLS with 127.0.0.1" in json.loads(response.data)["description"]
        assert origin.received == []
    finally:
        origin.stop()
