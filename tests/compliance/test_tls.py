"""TLS: the front serves 1.2 and newer only, with the configured certificate, whose key
matches and which is valid; the workers verify the upstream's certificate.

openssl runs on the audited host. For the old versions the client lowers its own security
level (`-cipher DEFAULT@SECLEVEL=0`), so a refusal is the server's, not the client's.
"""

from __future__ import annotations

import re
import shlex

import pytest

WARN_DAYS = 30


def handshake(host, node, version: str, extra: str = ""):
    openssl = host.find_command("openssl")
    return host.run(f"timeout {node.probe_timeout:g} {openssl} s_client -connect {node.front_target} -{version} {extra} </dev/null")


def served(result) -> str | None:
    """The protocol of a completed handshake, or None."""
    # "New, TLSv1.0, Cipher is X" names the cipher's own version; a failed handshake says
    # "New, (NONE), Cipher is (NONE)". The session block, when printed, has the protocol.
    if result.rc != 0 or not re.search(r"^New, \S+, Cipher is (?!\(NONE\))", result.stdout, re.M):
        return None
    protocol = re.search(r"^\s*Protocol\s*:\s*(\S+)", result.stdout, re.M)
    return protocol.group(1) if protocol else "handshake completed"


def assert_refused(host, node, control, version: str, name: str) -> None:
    result = handshake(host, node, version, "-cipher DEFAULT@SECLEVEL=0")
    output = result.stdout + result.stderr
    if "CONNECTED(" not in output:
        pytest.fail(f"cannot connect to the front at {node.front_target}: {output.strip()[-200:]}")
    if "no protocols available" in output:
        pytest.fail(f"the host's openssl cannot offer {name}; the control cannot be checked")
    protocol = served(result)
    assert protocol is None, f"the front accepted a {name} handshake ({protocol})"
    alert = re.search(r"alert [a-z ]+", output)
    control.note(f"{name} refused" + (f" ({alert.group(0)})" if alert else ""))


def assert_served(host, node, control, version: str, name: str) -> None:
    result = handshake(host, node, version)
    protocol = served(result)
    assert protocol, f"no {name} handshake with the front: {(result.stderr or result.stdout).strip()[-200:]}"
    control.note(f"{name} served ({protocol})")


def test_AP_TLS_01_tls10_refused(host, node, control):
    assert_refused(host, node, control, "tls1", "TLS 1.0")


def test_AP_TLS_02_tls11_refused(host, node, control):
    assert_refused(host, node, control, "tls1_1", "TLS 1.1")


def test_AP_TLS_03_tls12_served(host, node, control):
    assert_served(host, node, control, "tls1_2", "TLS 1.2")


def test_AP_TLS_04_tls13_served(host, node, control):
    assert_served(host, node, control, "tls1_3", "TLS 1.3")


def test_AP_TLS_05_certificate_matches_key(host, node, control):
    openssl = host.find_command("openssl")
    cert, key = shlex.quote(node.config.tls.cert_file), shlex.quote(node.config.tls.key_file)
    cert_pub = host.run(f"{openssl} x509 -in {cert} -noout -pubkey")
    key_pub = host.run(f"{openssl} pkey -in {key} -pubout")
    assert cert_pub.rc == 0, f"cannot read the certificate {cert}: {cert_pub.stderr.strip()}"
    assert key_pub.rc == 0, f"cannot read the key {key}: {key_pub.stderr.strip()}"
    assert cert_pub.stdout.strip() == key_pub.stdout.strip(), f"the public key of {cert} is not that of {key}"
    control.note("public keys of certificate and key are equal")


def test_AP_TLS_06_certificate_not_expired(host, node, control):
    openssl = host.find_command("openssl")
    cert = shlex.quote(node.config.tls.cert_file)
    end = host.run(f"{openssl} x509 -in {cert} -noout -enddate")
    assert end.rc == 0, f"cannot read the certificate {cert}: {end.stderr.strip()}"
    not_after = end.stdout.strip().partition("=")[2]
    expired = host.run(f"{openssl} x509 -in {cert} -noout -checkend 0").rc != 0
    assert not expired, f"{cert} expired on {not_after}"
    if host.run(f"{openssl} x509 -in {cert} -noout -checkend {WARN_DAYS * 86400}").rc != 0:
        control.warn(f"{cert} expires within {WARN_DAYS} days, on {not_after}")
    else:
        control.note(f"valid until {not_after}")


def test_AP_TLS_07_front_serves_configured_certificate(host, node, control):
    openssl = host.find_command("openssl")
    target = node.front_target
    fingerprint = f"{openssl} x509 -noout -fingerprint -sha256"
    on_wire = host.run(f"timeout {node.probe_timeout:g} {openssl} s_client -connect {target} </dev/null 2>/dev/null | {fingerprint}")
    on_disk = host.run(f"{fingerprint} -in {shlex.quote(node.config.tls.cert_file)}")
    assert on_wire.rc == 0 and on_wire.stdout.strip(), f"no certificate from the front at {target}"
    assert on_disk.rc == 0, f"cannot read {node.config.tls.cert_file}: {on_disk.stderr.strip()}"
    assert on_wire.stdout.strip() == on_disk.stdout.strip(), \
        f"the front serves a certificate other than tls.cert_file ({on_wire.stdout.strip()})"
    control.note(on_disk.stdout.strip())


def test_AP_TLS_08_upstream_verified(host, node, control):
    upstream = node.raw.get("upstream") or {}
    url, insecure = node.config.upstream.url, node.config.upstream.allow_insecure
    assert not url.startswith("http:"), f"upstream.url {url} is plain http: nothing is verified"
    assert not insecure, "upstream.allow_insecure is true"
    ca_file = upstream.get("ca_file")
    if ca_file:
        assert host.file(ca_file).is_file, f"upstream.ca_file {ca_file} does not exist on the host"
    control.note(f"https upstream verified against {ca_file or 'the system CAs'}")
