"""Northbound conformance: one test set, run against a real node front in each mode.

``front.mode: worker`` (HAProxy -> workers -> origin) and ``front.mode: native`` (HAProxy
relays northbound itself) must look the same to an agent and to the upstream: the same
stamped headers, a signature that verifies with the same secret, the same refusals and
errors. Every test runs once per mode through real HAProxy, real workers and the
recording origin (tests/origin.py); agents are 127.0.0.3, the only address in
``networks.agents``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
from http.client import HTTPSConnection
from urllib.parse import urlsplit

import pytest
import urllib3
import yaml

from agent_proxy import signing
from agent_proxy.tlsutil import self_signed
from kit import AGENT, SECRET, free_port, headers_of, start_node, wait_until
from tests.origin import Closing, Origin, ScriptedOrigin

MODES = ["worker", "native"]
MAX_BODY = 4 * 1024 * 1024
OUTSIDER = "127.0.0.5"  # not in networks.agents
# What each mode stamps on every northbound request (and nothing an agent sent survives).
STAMPED = ("x-agent-proxy-id", "x-agent-proxy-client-ip", "x-agent-proxy-signature", "forwarded",
           "x-forwarded-for", "x-forwarded-proto", "x-request-id", "host")
FORGED = {
    "X-Agent-Proxy-Id": "site-evil", "X-Agent-Proxy-Client-IP": "10.6.6.6",
    "X-Agent-Proxy-Signature": "v1 ts=1, sig=" + "0" * 64, "Forwarded": "for=10.6.6.6",
    "X-Forwarded-For": "10.6.6.6", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "http",
    "X-Real-IP": "10.6.6.6",
    # Underscores for dashes: the same header to a CGI or WSGI upstream.
    "X_Agent_Proxy_Client_IP": "10.6.6.6", "X-Agent_Proxy-Id": "site-evil", "X_Forwarded_For": "10.6.6.6",
}
HOP_BY_HOP = {"Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic eA==", "TE": "trailers",
              "Trailer": "X-Sum", "Proxy-Connection": "keep-alive"}
AGENTS_ONLY = {"networks": {"agents": [f"{AGENT}/32"], "upstream": ["127.0.0.0/8"]},
               "limits": {"max_body_bytes": MAX_BODY}}


@pytest.fixture(scope="module")
def origin():
    origin = Origin().start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module", params=MODES)
def node(request, origin, tmp_path_factory):
    mode = request.param
    front = start_node(tmp_path_factory.mktemp(f"node-{mode}"), origin.url + "/base", 2, [],
                       name=f"node-{mode}", mode=mode, **AGENTS_ONLY)
    yield front
    front.stop()


@pytest.fixture(scope="module")
def nodes(origin, tmp_path_factory):
    """One node of each mode at once, for the side-by-side comparison."""
    started = {mode: start_node(tmp_path_factory.mktemp(f"pair-{mode}"), origin.url + "/base", 1, [],
                                name=f"pair-{mode}", mode=mode, **AGENTS_ONLY) for mode in MODES}
    yield started
    for front in started.values():
        front.stop()


def call(port: int, method: str, target: str, headers: dict | None = None, body: bytes | None = None,
         source: str = AGENT, host: bool = True) -> tuple[int, dict[str, str], bytes]:
    """One request over TLS from ``source``, the target sent exactly as given (``host``
    False: without a Host header)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = HTTPSConnection("127.0.0.1", port, context=context, timeout=30, source_address=(source, 0))
    try:
        connection.putrequest(method, target, skip_host=not host, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def echo(port: int, target: str = "/agent/v1/checkin", headers: dict | None = None, method: str = "GET") -> dict:
    status, _, data = call(port, method, target, headers)
    assert status == 200, data
    return json.loads(data)


def curl(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sSk", "--max-time", "60", "--interface", AGENT, *args,
                           f"https://127.0.0.1:{port}/echo"], capture_output=True, timeout=90)


def assert_contract_error(status: int, headers: dict, data: bytes, expected_status: int, code: str, title: str) -> None:
    assert status == expected_status, data
    assert headers["x-agent-proxy-error"] == code
    assert headers["content-type"] == "application/json"
    assert json.loads(data)["title"] == title


def test_identity_is_stamped_and_signed(node):
    seen = echo(node.port, "/agent/v1/checkin?b=2&a=%2F1", {"X-Custom": "kept", "X-Request-ID": "agent-id.1:2"})
    got = headers_of(seen)
    assert seen["target"] == "/base/agent/v1/checkin?b=2&a=%2F1"
    assert got["x-agent-proxy-id"] == ["site-a"]
    assert got["x-agent-proxy-client-ip"] == [AGENT]
    assert got["x-forwarded-for"] == [AGENT]
    assert got["x-forwarded-proto"] == ["https"]
    assert got["forwarded"] == [f'for="{AGENT}";by="site-a"']
    assert got["x-request-id"] == ["agent-id.1:2"]
    assert got["host"] == [urlsplit(yaml.safe_load(node.config.read_text())["upstream"]["url"]).netloc]
    assert got["x-custom"] == ["kept"]
    assert got["via"] == ["1.1 agent-proxy"]
    signing.verify_signature_header(
        got["x-agent-proxy-signature"][0], SECRET.encode(), "site-a", "GET", seen["target"], AGENT,
    )


def test_forged_identity_headers_are_dropped(node):
    got = headers_of(echo(node.port, headers=FORGED))
    for name in FORGED:
        assert name.lower() not in got or got[name.lower()] != [FORGED[name]], name
    assert "x-forwarded-host" not in got and "x-real-ip" not in got
    assert not [name for name in got if "_" in name]
    assert got["x-agent-proxy-client-ip"] == [AGENT] and got["x-forwarded-for"] == [AGENT]


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"a\x1bb", b"a\x7fb"], ids=["nul", "soh", "esc", "del"])
def test_control_characters_in_a_header_value_are_400(node, origin, value):
    """RFC 9110 5.5: NUL is never relayed, nor any control character but TAB."""
    before = len(origin.received)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", node.port), 10, source_address=(AGENT, 0))) as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Note: " + value + b"\r\nConnection: close\r\n\r\n")
        answer = b"".join(iter(lambda: tls.recv(65536), b""))
    head, _, data = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head), answer[:300]
    assert b"\r\nx-agent-proxy-error: bad-request" in head.lower() and json.loads(data)["title"] == "Bad request"
    assert len(origin.received) == before
    assert echo(node.port, headers={"X-Note": "a\tb"})["target"] == "/base/agent/v1/checkin"


@pytest.mark.parametrize("connection", [None, "keep-alive", "X-Drop-Me"])
def test_hop_by_hop_headers_are_dropped(node, connection):
    headers = dict(HOP_BY_HOP, **{"X-Drop-Me": "named by Connection"})
    if connection:
        headers["Connection"] = connection
    got = headers_of(echo(node.port, headers=headers))
    for name in [*HOP_BY_HOP, "Connection"]:
        assert name.lower() not in got, name
    assert ("x-drop-me" in got) == (connection != "X-Drop-Me")
    assert got["x-agent-proxy-id"] == ["site-a"]


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "semi;colon"])
def test_request_id_is_generated_when_missing_or_invalid(node, given):
    headers = {} if given is None else {"X-Request-ID": given}
    ids = [headers_of(echo(node.port, headers=headers))["x-request-id"] for _ in range(2)]
    assert all(len(found) == 1 for found in ids)
    assert ids[0] != ids[1] and given not in (ids[0][0], ids[1][0])
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", found[0]) for found in ids)


def test_binary_body_round_trip(node):
    body = os.urandom(1024 * 1024) + b"\x00\r\n\r\n\xff"
    status, _, data = call(node.port, "PUT", "/echo", {"Content-Type": "application/octet-stream"}, body)
    assert status == 200
    seen = json.loads(data)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["body_size"] == len(body)
    assert seen["method"] == "PUT"


def test_chunked_upload_is_relayed_whole(node, tmp_path):
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    done = curl(node.port, "-H", "Transfer-Encoding: chunked", "-H", "Expect:", "--data-binary", f"@{payload}")
    seen = json.loads(done.stdout)
    assert seen["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert seen["body_size"] == payload.stat().st_size
    assert headers_of(seen)["x-agent-proxy-client-ip"] == [AGENT]


def test_large_download_is_streamed_whole(node):
    done = subprocess.run(
        ["curl", "-sSk", "--max-time", "60", "--interface", AGENT, "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         f"https://127.0.0.1:{node.port}/big?n={64 * 1024 * 1024}"], capture_output=True, text=True, timeout=90)
    assert done.stdout == f"200 {64 * 1024 * 1024}", done.stderr


def test_upstream_connections_are_reused(node, origin):
    """Ten agents' calls, each on its own new connection to the front, share a few to the upstream."""
    if node.mode != "native":
        pytest.skip("worker mode: each worker thread keeps its own (tests/integration/test_relay_client.py)")
    before = len(origin.received)
    for _ in range(10):
        echo(node.port)
    ports = {record["client_port"] for record in origin.received[before:]}
    assert len(ports) <= 4, f"{len(ports)} upstream connections for 10 requests"


def test_upstream_errors_pass_through_without_the_proxys_error_header(node):
    status, headers, data = call(node.port, "GET", "/status/503")
    assert (status, data) == (503, b'{"origin": "own error"}') and "x-agent-proxy-error" not in headers
    # An upstream claiming its error is the proxy's does not get the header through.
    status, headers, data = call(node.port, "GET", "/status/502?forge=1")
    assert (status, data) == (502, b'{"origin": "own error"}') and "x-agent-proxy-error" not in headers


def test_head_has_no_body(node):
    status, headers, data = call(node.port, "HEAD", "/echo")
    assert status == 200 and data == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("target", ["/a%2Fb/%7e/./x?q=%20&q=2&flag", "/_proxyish/x?y", "/%5Fproxy"])
def test_raw_path_and_query_are_kept(node, target):
    seen = echo(node.port, target)
    assert seen["target"] == "/base" + target
    got = headers_of(seen)
    signing.verify_signature_header(got["x-agent-proxy-signature"][0], SECRET.encode(), "site-a", "GET", seen["target"], AGENT)


@pytest.mark.parametrize("target", ["/_proxy/features", "//_proxy/features", "///_proxy/features", "/%2F_proxy/features"])
def test_proxy_paths_stay_with_the_workers(node, origin, target):
    # The workers route the path decoded, its leading slashes as one (waitress's PATH_INFO):
    # the native front hands them the same paths, so nothing a worker would answer goes north.
    before = len(origin.received)
    status, _, data = call(node.port, "GET", target)
    assert status == 200 and "northbound" in json.loads(data), data
    status, headers, _ = call(node.port, "GET", target.replace("features", "nothing").replace("_proxy", "%5Fproxy"))
    assert status == 404 and headers["x-agent-proxy-error"] == "not-found"
    assert len(origin.received) == before


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_counts_down_and_ends_at_the_proxy(node, origin, method):
    """RFC 9110 7.6.2: an OPTIONS or TRACE goes on with Max-Forwards one less; at 0 the
    proxy answers it itself (OPTIONS: the methods it relays; TRACE: 405, it reflects none)."""
    got = headers_of(echo(node.port, headers={"Max-Forwards": "5"}, method=method))
    assert got["max-forwards"] == ["4"] and got["x-agent-proxy-id"] == ["site-a"]
    assert headers_of(echo(node.port, headers={"Max-Forwards": "1"}, method=method))["max-forwards"] == ["0"]
    before = len(origin.received)
    status, headers, data = call(node.port, method, "/echo", {"Max-Forwards": "0"})
    if method == "OPTIONS":
        assert status == 200 and data == b"", data
    else:
        assert_contract_error(status, headers, data, 405, "method-not-allowed", "Method not allowed")
    assert headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert len(origin.received) == before


@pytest.mark.parametrize("value", ["", "-1", "1.5", "two", "1, 2"])
def test_max_forwards_that_is_not_a_number_is_400(node, origin, value):
    before = len(origin.received)
    status, headers, data = call(node.port, "OPTIONS", "/echo", {"Max-Forwards": value})
    assert_contract_error(status, headers, data, 400, "bad-request", "Bad request")
    assert "Max-Forwards" in json.loads(data)["description"]
    assert len(origin.received) == before


def test_max_forwards_on_other_methods_passes_untouched(node):
    assert headers_of(echo(node.port, headers={"Max-Forwards": "0"}))["max-forwards"] == ["0"]


def test_sources_outside_networks_agents_are_refused(node, origin):
    before = len(origin.received)
    status, headers, data = call(node.port, "GET", "/echo", source=OUTSIDER)
    assert_contract_error(status, headers, data, 403, "source-not-allowed", "Forbidden")
    assert OUTSIDER in json.loads(data)["description"]
    assert len(origin.received) == before


def test_absolute_form_target_is_refused(node):
    status, headers, data = call(node.port, "GET", "http://127.0.0.1/echo")
    assert_contract_error(status, headers, data, 400, "bad-target", "Bad target")


def test_http_1_1_without_host_is_400_and_http_1_0_needs_none(node, origin):
    before = len(origin.received)
    status, headers, data = call(node.port, "GET", "/echo", host=False)
    assert_contract_error(status, headers, data, 400, "bad-request", "Bad request")
    assert "without a Host header" in json.loads(data)["description"]
    assert len(origin.received) == before
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", node.port), 10, source_address=(AGENT, 0))) as tls:
        tls.sendall(b"GET /echo/http-1.0 HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: tls.recv(65536), b""))
    assert re.match(rb"HTTP/1\.[01] 200 ", answer), answer[:300]
    assert origin.received[-1]["target"] == "/base/echo/http-1.0"


def test_body_over_the_limit_is_413(node, origin, tmp_path):
    """Known by Content-Length or only at the end of a chunked body: a 413 the client reads."""
    before = len(origin.received)
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * (MAX_BODY + 1))
    # curl's own way with a large body (Expect: 100-continue): the 413 comes before the body
    # is sent. Then a chunked body, over the limit only at its end, sent without waiting.
    for expect, framing in (("Expect: 100-continue", "Content-Type: application/octet-stream"),
                            ("Expect:", "Transfer-Encoding: chunked")):
        done = curl(node.port, "-i", "-H", expect, "-H", framing, "--data-binary", f"@{payload}")
        head, _, data = done.stdout.rpartition(b"\r\n\r\n")
        assert b"\r\nHTTP/1.1 413 " in b"\r\n" + head, done
        assert b"\r\nx-agent-proxy-error: body-too-large" in head.lower()
        assert json.loads(data)["title"] == "Body too large"
    # A client that sends the whole body without reading: the 413 is on the connection before
    # it closes. (HAProxy 2.6 closes with the rest of the body unread, so that client's sends
    # may fail first; curl then gives up without reading: haproxy/README.md, "Body limit".)
    request = f"POST /echo HTTP/1.1\r\nHost: proxy\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    head, _, data = exchange_tls(node.port, request + b"x" * (MAX_BODY + 1)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"\r\nx-agent-proxy-error: body-too-large" in head.lower()
    assert json.loads(data)["title"] == "Body too large"
    assert len(origin.received) == before
    status, _, _ = call(node.port, "POST", "/echo", body=b"x" * MAX_BODY)
    assert status == 200


@pytest.mark.parametrize("mode", MODES)
def test_upstream_down_is_502(mode, tmp_path):
    front = start_node(tmp_path, f"http://127.0.0.1:{free_port()}", 1, [], name=f"down-{mode}", mode=mode, **AGENTS_ONLY)
    try:
        status, headers, data = call(front.port, "GET", "/echo")
        assert_contract_error(status, headers, data, 502, "upstream-unreachable", "Bad gateway")
    finally:
        front.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_control_character_in_an_answers_header_a_status_outside_100_599_or_another_version_is_502_bad_answer(
        mode, tmp_path):
    """RFC 9110 5.5: NUL in a field value is never relayed, nor any control character but
    TAB; RFC 9110 15: a status is 100-599; RFC 9112 2.5: an HTTP/1.1 answer says HTTP/1.0
    or HTTP/1.1 (HAProxy would relay 099 without its Content-Length, and HTTP/1.2 as 1.1)."""
    answers = [b"HTTP/1.1 200 OK\r\nX-A: a" + c + b"b\r\nContent-Length: 2\r\n\r\nok" for c in (b"\x00", b"\x01", b"\x7f")]
    answers += [b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok" for status in (b"600 Beyond", b"099 Low", b"000 Zero")]
    answers += [version + b" 200 OK\r\nContent-Length: 2\r\n\r\nok" for version in (b"HTTP/1.2", b"HTTP/2.0")]
    good = [b"HTTP/1.1 200 OK\r\nX-A: a\tb\r\nContent-Length: 2\r\n\r\nok",
            Closing(b"HTTP/1.0 200 OK\r\nX-A: a\tb\r\nContent-Length: 2\r\n\r\nok")]
    origin = ScriptedOrigin(answers + good)
    front = start_node(tmp_path, origin.url, 1, [], name=f"ctl-{mode}", mode=mode, **AGENTS_ONLY)
    try:
        for answer in answers:
            status, headers, data = call(front.port, "GET", "/echo")
            assert_contract_error(status, headers, data, 502, "bad-answer", "Bad gateway")
            assert "sent a bad answer" in json.loads(data)["description"], answer
        for _ in good:
            status, headers, data = call(front.port, "GET", "/echo")
            assert (status, headers["x-a"], data) == (200, "a\tb", b"ok")
    finally:
        front.stop()
        origin.close()


@pytest.mark.parametrize("mode", MODES)
def test_an_origin_that_closes_after_an_interim_answer_gets_the_contracts_error_or_a_cut(mode, tmp_path):
    """No final answer came: the agent gets the contract's JSON error or a cut connection,
    never HAProxy's own HTML page. Through the workers: 502 bad-answer. Native
    (haproxy/README.md): the interim answer is relayed; then a POST gets 502, and a GET,
    which HAProxy's retry-on empty-response tries to resend, 500 internal-error or the cut."""
    origin = ScriptedOrigin([Closing(b"HTTP/1.1 100 Continue\r\n\r\n")] * 4)
    front = start_node(tmp_path, origin.url, 1, [], name=f"interim-{mode}", mode=mode, **AGENTS_ONLY)
    try:
        for method in ("POST", "GET", "GET", "GET"):
            answer = exchange_tls(front.port, f"{method} /echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
                                              f"{'Content-Length: 0' if method == 'POST' else ''}\r\n\r\n".encode())
            assert b"<html>" not in answer, answer
            final = re.sub(rb"^HTTP/1\.1 1\d\d [^\r]*\r\n\r\n", b"", answer)  # the interim answer, if relayed
            if mode == "worker" or method == "POST":
                expected = {"worker": "bad-answer", "native": "upstream-unreachable"}[mode]
                assert final.startswith(b"HTTP/1.1 502 "), answer
            elif final:
                expected = "internal-error"
                assert final.startswith(b"HTTP/1.1 500 "), answer
            else:
                continue
            head, _, data = final.partition(b"\r\n\r\n")
            assert f"\r\nx-agent-proxy-error: {expected}\r\n".encode() in head.lower() + b"\r\n", answer
            assert json.loads(data)["title"] in ("Bad gateway", "Internal error")
    finally:
        front.stop()
        origin.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """An origin certificate for a name and one for an address (an IP SAN), and a client's."""
    tmp = tmp_path_factory.mktemp("pki")
    for name, host in (("localhost", "localhost"), ("127.0.0.1", "127.0.0.1"), ("client", "site-a")):
        cert, key = self_signed(host, [host])
        (tmp / f"{name}.crt").write_bytes(cert)
        (tmp / f"{name}.key").write_bytes(key)
    return tmp


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
@pytest.mark.parametrize("mode", MODES)
def test_upstream_tls_is_verified_with_ca_file_and_client_certificate(mode, host, pki, tmp_path):
    tls_origin = Origin(tls=(str(pki / f"{host}.crt"), str(pki / f"{host}.key")), client_ca=str(pki / "client.crt")).start()
    url = f"https://{host}:{tls_origin.port}"
    good = {"url": url, "ca_file": str(pki / f"{host}.crt"),
            "client_cert": str(pki / "client.crt"), "client_key": str(pki / "client.key")}
    untrusted = {"url": url, "ca_file": str(pki / "client.crt")}  # a CA that did not sign the origin
    try:
        for name, upstream, expected in (("good", good, 200), ("untrusted", untrusted, 502)):
            front = start_node(tmp_path / name, url, 1, [], name=f"tls-{mode}-{name}", mode=mode,
                               upstream=upstream, **AGENTS_ONLY)
            try:
                status, headers, data = call(front.port, "GET", "/echo")
            finally:
                front.stop()
            assert status == expected, data
            if expected == 502:
                assert headers["x-agent-proxy-error"] == "upstream-unreachable"
        assert len(tls_origin.received) == 1
        got = headers_of(tls_origin.received[0])
        assert got["host"] == [f"{host}:{tls_origin.port}"]
    finally:
        tls_origin.stop()


def access_lines(node) -> list[dict]:
    """The JSON access lines of whoever relayed northbound: HAProxy in native mode, else the workers."""
    procs = [node.haproxy] if node.mode == "native" else list(node.workers.values())
    lines = [line for proc in procs for line in proc.output().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def test_access_line_has_the_workers_fields(node):
    request_id = f"log-check-{node.mode}"
    echo(node.port, "/agent/v1/checkin?secret-query=1", {"X-Request-ID": request_id}, method="POST")
    found = []
    wait_until(lambda: found.extend(l for l in access_lines(node) if l.get("request_id") == request_id) or found,
               5, "the access line")
    line = found[0]
    native = ["termination_state"] if node.mode == "native" else []
    assert list(line) == ["ts", "level", "logger", "message", "request_id", "direction", "client_ip", "method",
                          "target", "status", "bytes_in", "bytes_out", "duration_ms", "outcome", "origin_ms", *native]
    assert line["outcome"] == "complete"
    assert line.get("termination_state", "----") == "----"
    assert 0 <= line["origin_ms"] <= line["duration_ms"] + 1
    assert (line["logger"], line["direction"], line["client_ip"], line["method"], line["target"], line["status"]) == (
        "agent_proxy.access", "northbound", AGENT, "POST", "/agent/v1/checkin", 200)
    assert line["bytes_out"] > 0 and line["bytes_in"] == 0


def test_access_line_of_a_refusal_says_refused(node):
    status, _, _ = call(node.port, "GET", "/echo", source=OUTSIDER)
    assert status == 403
    found = []
    wait_until(lambda: found.extend(l for l in access_lines(node) if l.get("client_ip") == OUTSIDER) or found,
               5, "the access line")
    assert (found[-1]["status"], found[-1]["outcome"], found[-1]["direction"]) == (403, "refused", "northbound")


def test_native_front_exports_prometheus_metrics(node):
    if node.mode != "native":
        pytest.skip("worker mode: the workers' /_proxy/metrics count northbound calls")
    echo(node.port)
    text = urllib3.request("GET", f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).data.decode()
    answered = re.search(r'^haproxy_backend_http_responses_total\{proxy="upstream",code="2xx"\} (\d+)$', text, re.M)
    assert answered and int(answered.group(1)) >= 1


def test_both_modes_send_the_origin_the_same_stamped_headers(nodes, origin):
    target = "/agent/v1/checkin?id=%2Fvm-1"
    headers = {**FORGED, "X-Request-ID": "same-id", "User-Agent": "agent/1.0"}
    seen = {mode: echo(front.port, target, headers, method="POST") for mode, front in nodes.items()}
    stamped = {}
    for mode, record in seen.items():
        got = headers_of(record)
        signing.verify_signature_header(got.pop("x-agent-proxy-signature")[0], SECRET.encode(), "site-a",
                                        "POST", record["target"], AGENT)
        stamped[mode] = {name: got.get(name) for name in STAMPED if name != "x-agent-proxy-signature"}
        stamped[mode]["other"] = sorted(n for n in got if n not in STAMPED and n != "content-length")
        stamped[mode]["target"] = record["target"]
    assert stamped["native"] == stamped["worker"]


def exchange_tls(port: int, request: bytes, timeout: float = 10) -> bytes:
    """``request`` as raw bytes over TLS from the agent, all of it before reading (a send the
    front cut short, having answered and closed, ends it); all that came back until it closed."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout, source_address=(AGENT, 0))) as tls:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            tls.sendall(request)
        answer = b""
        try:
            while data := tls.recv(65536):
                answer += data
        except (ConnectionResetError, ssl.SSLError):
            pass
    return answer


@pytest.mark.parametrize("length", [2 ** 32 + 1000, 2 ** 63 - 1, 2 ** 64 - 1])
def test_a_content_length_too_large_to_hold_is_413(node, origin, length):
    """Over limits.max_body_bytes whatever its width: HAProxy 2.6 reads a header as a
    32-bit number, and 2**32 + 1000 would pass as 1000. (Past 64 bits HAProxy's own
    parser refuses the head with its HTML 400, haproxy/README.md.)"""
    before = len(origin.received)
    answer = exchange_tls(node.port, f"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: {length}\r\n\r\n".encode()
                          + b"x" * 20000)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"\r\nx-agent-proxy-error: body-too-large" in answer.lower(), answer[:300]
    assert len(origin.received) == before


@pytest.mark.parametrize("target", ["/_proxy/features%zz", "/_proxy/%zz", "/_proxy/health%", "/%2F_proxy/nothing%zz",
                                    "/_proxy/feat%2"])
def test_proxy_paths_with_bad_escapes_stay_with_the_workers(node, origin, target):
    before = len(origin.received)
    status, headers, data = call(node.port, "GET", target)
    assert (status, headers["x-agent-proxy-error"]) == (404, "not-found"), data
    status, headers, _ = call(node.port, "GET", "/_proxy/agents/10.0.0.2/2003/cmd%zz")
    assert (status, headers["x-agent-proxy-error"]) == (401, "bad-signature")
    assert len(origin.received) == before
    seen = echo(node.port, "/agent/v1/odd%zz?q=%")    # a northbound path the same: relayed as sent
    assert seen["target"] == "/base/agent/v1/odd%zz?q=%"


def test_hop_by_hop_headers_of_an_answer_are_dropped(node, tmp_path):
    answer = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
              b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTE: trailers\r\nTrailer: X-Sum\r\nX-Kept: yes\r\n\r\nok")
    origin = ScriptedOrigin([answer])
    front = start_node(tmp_path, origin.url, 1, [], name=f"hop-{node.mode}", mode=node.mode, **AGENTS_ONLY)
    try:
        status, headers, data = call(front.port, "GET", "/echo")
        assert (status, data, headers["x-kept"]) == (200, b"ok", "yes")
        assert not {"keep-alive", "proxy-authenticate", "proxy-connection", "upgrade", "te", "trailer"} & set(headers)
    finally:
        front.stop()
        origin.close()


@pytest.mark.parametrize("bad", [b"GET /echo HTTP/1.1\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n",
                                 b"GET /echo HTTP/1.1\r\nHost: p\r\nX-A: a\x01b\r\n\r\n"],
                         ids=["no-host", "bad-host", "control-byte"])
def test_nothing_after_a_bad_request_is_read_as_a_next_one(node, origin, bad):
    """RFC 9112 6.1: after a 400 for a request's framing the connection closes; a request
    pipelined behind it never reaches the upstream."""
    before = len(origin.received)
    answer = exchange_tls(node.port, bad + b"GET /echo/smuggled HTTP/1.1\r\nHost: p\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:300]
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", answer)) == 1, answer
    assert len(origin.received) == before


def test_every_access_line_is_json_even_for_what_haproxy_refuses(node):
    """A request HAProxy's parser refuses (two differing Host headers) and one with a long
    target: each access line is one JSON object (not "bytes_in": -, not cut at 1 KiB)."""
    exchange_tls(node.port, b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    target = "/agent/v1/" + "long" * 800
    status, _, _ = call(node.port, "GET", target)
    assert status == 200
    found = []
    # access_lines() parses every line: one that is not JSON fails here.
    wait_until(lambda: found.extend(l for l in access_lines(node) if l.get("target") == target) or found,
               5, "the long target's access line")
    if node.mode == "native":
        refused = [l for l in access_lines(node) if l["status"] == 400 and l["client_ip"] == AGENT]
        assert refused and refused[-1]["bytes_in"] == 0
