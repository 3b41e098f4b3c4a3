"""Requests whose framing is ambiguous, or whose target carries control bytes, never reach an origin.

Raw sockets against a real `agent-proxy serve`; the upstream is a ScriptedOrigin, which
records every request and connection it gets, so "nothing was forwarded" means neither.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import yaml

from kit import start_worker, write_config
from tests.origin import ScriptedOrigin


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(scope="module")
def origin():
    # Two answers: the well-framed requests'. A refused request that got through would be
    # recorded all the same (and left unanswered).
    origin = ScriptedOrigin([OK, OK])
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def worker(origin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("framing")
    config = write_config(tmp, f"http://127.0.0.1:{origin.port}")
    proc = start_worker(config, tmp)
    yield yaml.safe_load(config.read_text())["listen"]["port"]
    assert proc.stop() == 0, proc.output()


def exchange(port: int, request: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Send ``request``; return what came back and whether the worker closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return answer, False
            if not data:
                return answer, True
            answer += data
        return answer, False


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: origin\r\n\r\n"

BAD_FRAMING = {
    "content-length-and-chunked": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "chunked-and-content-length": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "gzip-then-chunked": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "chunked-twice": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "two-te-headers": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "identity": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\nContent-Length: 0\r\n\r\n" + SMUGGLED,
    "empty-te": b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: \r\n\r\n" + SMUGGLED,
    "te-on-http-1.0": b"POST /agent/v1/checkin HTTP/1.0\r\nHost: p\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
}

# RFC 9112 3.2: an HTTP/1.1 request with no Host, more than one, or one that is not
# host[:port] (RFC 9110 7.2) is a 400.
BAD_HOST = {
    "none-on-http-1.1": b"GET /agent/v1/checkin HTTP/1.1\r\n\r\n",
    "two-alike": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nHost: p\r\n\r\n",
    "two-differing": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nhOST: evil\r\n\r\n",
    "space-inside": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p q\r\n\r\n",
    "userinfo": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: user@p\r\n\r\n",
    "path": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p/x\r\n\r\n",
    "port-not-digits": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p:80a\r\n\r\n",
}
# RFC 9112 5.2: a server rejects obsolete line folding (or unfolds it; unfolded, a folded
# Host would read "a b"); and the request line ends in HTTP/1.x (no HTTP/0.9, no 2).
BAD_LINES = {
    "folded-host": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: a\r\n b\r\n\r\n",
    "folded-other": b"GET /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nX-A: 1\r\n\t2\r\n\r\n",
    "space-before-first-field": b"GET /agent/v1/checkin HTTP/1.1\r\n X-A: 1\r\nHost: p\r\n\r\n",
    "http-0.9": b"GET /agent/v1/checkin\r\n\r\n",
    "http-2.0": b"GET /agent/v1/checkin HTTP/2.0\r\nHost: p\r\n\r\n",
    "http-lower-case": b"GET /agent/v1/checkin http/1.1\r\nHost: p\r\n\r\n",
}
# ... and these are good Host headers, or none where none is needed.
GOOD_HOST = {
    "none-on-http-1.0": b"GET /agent/v1/one HTTP/1.0\r\n\r\n",
    "empty": b"GET /agent/v1/two HTTP/1.1\r\nHost:\r\n\r\n",
    "ipv6-and-port": b"GET /agent/v1/three HTTP/1.1\r\nHost: [fd00::2]:2002\r\n\r\n",
    "name-case-and-port": b"GET /agent/v1/four HTTP/1.1\r\nHOST:  Proxy.Example:2002 \r\nX-Host: a b\r\n\r\n",
}

CONTROL_TARGETS = {
    "nul": b"/agent/v1/check\x00in",
    "tab": b"/agent/v1/check\tin",
    "soh": b"/agent/\x01",
    "escape": b"/agent/\x1b[31m",
    "unit-separator": b"/agent/\x1f",
    "del": b"/agent/\x7f",
    "nul-in-query": b"/agent/v1/checkin?a=\x00",
    "tab-in-southbound": b"/_proxy/agents/10.0.0.2/2003/\tx",
    "tab-after-version": None,  # the whole line below
}


def assert_refused(port: int, origin: ScriptedOrigin, request: bytes) -> None:
    connections = origin.connections
    answer, closed = exchange(port, request)
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert re.match(r"HTTP/1\.[01] 400 ", head), answer
    assert "\r\nX-Agent-Proxy-Error: bad-request" in head, answer
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", answer)) == 1, "a second answer: the rest was read as a request"
    assert closed, "the connection stayed open"
    time.sleep(0.2)  # a relayed request would have reached the origin by now
    assert origin.requests == [] and origin.connections == connections


@pytest.mark.parametrize("request_bytes", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
def test_ambiguous_framing_is_400_closed_and_not_forwarded(worker, origin, request_bytes):
    assert_refused(worker, origin, request_bytes)


@pytest.mark.parametrize("request_bytes", BAD_HOST.values(), ids=BAD_HOST.keys())
def test_a_missing_repeated_or_malformed_host_is_400_and_not_forwarded(worker, origin, request_bytes):
    assert_refused(worker, origin, request_bytes)


@pytest.mark.parametrize("request_bytes", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_folded_lines_and_other_versions_are_400_and_not_forwarded(worker, origin, request_bytes):
    assert_refused(worker, origin, request_bytes)


def test_good_host_headers_and_http_1_0_without_one_are_relayed(tmp_path):
    origin = ScriptedOrigin([OK] * len(GOOD_HOST))
    proc = start_worker(write_config(tmp_path, f"http://127.0.0.1:{origin.port}"), tmp_path)
    try:
        port = yaml.safe_load((tmp_path / "agent-proxy.yaml").read_text())["listen"]["port"]
        for name, request in GOOD_HOST.items():
            answer, _ = exchange(port, request)
            assert answer.startswith((b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK")), (name, answer)
        targets = [r.split(b" ", 2)[1] for r in origin.requests]
        assert targets == [r.split(b" ", 2)[1] for r in GOOD_HOST.values()]
    finally:
        assert proc.stop() == 0, proc.output()
        origin.close()


@pytest.mark.parametrize("target", [t for t in CONTROL_TARGETS.values() if t], ids=[k for k, t in CONTROL_TARGETS.items() if t])
def test_control_bytes_in_the_target_are_400_and_not_forwarded(worker, origin, target):
    assert_refused(worker, origin, b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")


def test_a_tab_after_the_version_is_400(worker, origin):
    assert_refused(worker, origin, b"GET /agent/v1/checkin HTTP/1.1\t\r\nHost: p\r\n\r\n")


def test_well_framed_requests_still_pass_on_one_connection(worker, origin):
    # The refusals above must not come from refusing everything: a chunked POST and a GET
    # on the same connection both reach the origin and both are answered.
    request = (
        b"POST /agent/v1/checkin HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /agent/v1/next?a=%00 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    answer, closed = exchange(worker, request)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    received = b"".join(origin.requests)
    assert b"POST /agent/v1/checkin HTTP/1.1\r\n" in received and b"\r\n\r\nhello" in received
    assert b"GET /agent/v1/next?a=%00 HTTP/1.1\r\n" in received


@pytest.mark.parametrize("expect", [True, False])
def test_a_body_over_the_limit_is_refused_before_it_is_sent(tmp_path, expect):
    """Expect: 100-continue with a Content-Length over limits.max_body_bytes: 413 at once,
    no "100 Continue" inviting the body, nothing relayed, the connection closed. Without
    Expect, the same for a length over waitress's own cap (twice the limit + 1 MiB)."""
    origin = ScriptedOrigin([OK])
    config = write_config(tmp_path, f"http://127.0.0.1:{origin.port}", limits={"max_body_bytes": 1000})
    proc = start_worker(config, tmp_path)
    try:
        port = yaml.safe_load(config.read_text())["listen"]["port"]
        connections = origin.connections
        for length in ((1001, 5_000_000) if expect else (5_000_000,)):   # over the limit; over waitress's cap
            head = (f"POST /agent/v1/upload HTTP/1.1\r\nHost: p\r\nContent-Length: {length}\r\n"
                    + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode()
            answer, closed = exchange(port, head, timeout=5)
            assert answer.startswith(b"HTTP/1.1 413 "), answer
            assert b"100 Continue" not in answer and closed
            assert b"\r\nX-Agent-Proxy-Error: body-too-large\r\n" in answer
        time.sleep(0.2)
        assert origin.connections == connections
        # At the limit, Expect gets its 100 Continue and the body goes through.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /agent/v1/upload HTTP/1.1\r\nHost: p\r\nContent-Length: 1000\r\n"
                         b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"x" * 1000)
            rest = b""
            while data := sock.recv(65536):
                rest += data
        assert b"HTTP/1.1 200 OK" in rest, rest
        assert len(origin.requests) == 1
    finally:
        assert proc.stop() == 0, proc.output()
        origin.close()
