"""Hostile and broken origins, through a real worker (`agent-proxy serve`) and through the node front.

The upstream is a raw-socket origin answering the bytes each test scripts
(tests.origin.ScriptedOrigin). What is asserted is what a client sees (the status, the
error header, a connection cut before the answer's end: curl's exit 18, a raw read that
meets EOF before the last chunk) and what the origin received (one request when one was
sent). Workers run one thread, so that consecutive requests share one upstream
connection, as a busy worker's threads do.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time

import pytest
import yaml

from kit import dechunk, start_node, start_worker, wait_until, write_config
from tests.origin import CLOSE, Closing, Drip, Early, ScriptedOrigin

TIMEOUTS = {"head_timeout": 1, "idle_timeout": 1, "read_timeout": 5}
OK_A = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
OK_B = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"


class Worker:
    def __init__(self, proc, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.proc.output().splitlines() if line.startswith("{")]

    def access_lines(self) -> list[dict]:
        return [line for line in self.log_lines() if line["logger"] == "agent_proxy.access"]

    def metric(self, name: str) -> float:
        text = curl(f"{self.url}/_proxy/metrics").stdout.decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def scripted_worker(tmp_path):
    started = []

    def start(*script, **upstream) -> tuple[ScriptedOrigin, Worker]:
        origin = ScriptedOrigin(list(script))
        config = write_config(tmp_path, origin.url, upstream={**TIMEOUTS, **upstream}, limits={"threads": 1})
        proc = start_worker(config, tmp_path)
        started.append((origin, proc))
        return origin, Worker(proc, yaml.safe_load(config.read_text())["listen"]["port"])

    yield start
    for origin, proc in started:
        assert proc.stop() == 0, proc.output()
        origin.close()
        assert "Traceback" not in proc.log_path.read_text()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=40)


def fetch(url: str, *args: str) -> tuple[int, dict, bytes, int]:
    """(status, headers lower-cased, body, curl's exit status)."""
    done = curl("-i", *args, url)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body, done.returncode


def raw_get(port: int, path: str = "/x") -> bytes:
    """Everything a raw HTTP/1.1 GET gets back until the worker closes the connection (or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: w\r\n\r\n".encode())
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except socket.timeout:
            pass
    return received


# -- a bad answer before its head was relayed: 502 bad-answer


@pytest.mark.parametrize("answer, reason", [
    (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", "a control character in the value of X-A"),
    ("HTTP/1.1 200 OK\r\nContent-Length: ٥\r\n\r\nhello".encode(), "bad Content-Length"),
    (b"HTTP/1.1 200 O\rK\r\nContent-Length: 2\r\n\r\nok", "bare LF or CR"),
    (b"HTTP/1.1 200 OK\r\nX-Long: one\r\n two\r\nContent-Length: 2\r\n\r\nok", "obs-fold"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
    (Closing(b"<html>no head at all</html>"), "HTTP/0.9 or garbage"),
    (b"HTTP/1.1 103 Early Hints\r\n\r\n" * 9, "more than 8 interim"),
    (Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"), "5 bytes short of the body"),
    # streamed answers whose body breaks before its first byte: the head is not yet relayed
    (CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", "bad chunk size line b'-5'"),
    (CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n", "a chunk size line over 4096 bytes"),
])
def test_a_bad_answer_is_a_502_bad_answer_with_one_log_line_and_the_connection_dropped(scripted_worker, answer, reason):
    origin, worker = scripted_worker(OK_A, answer, OK_B)
    assert fetch(worker.url + "/first")[2] == b"a"
    status, headers, body, _ = fetch(worker.url + "/bad")
    assert (status, headers["x-agent-proxy-error"]) == (502, "bad-answer")
    assert reason in json.loads(body)["description"]
    assert headers["server"] == "agent-proxy"   # the proxy's own answer, streamed or not
    assert fetch(worker.url + "/after")[2] == b"b"
    assert (len(origin.requests), origin.connections) == (3, 2)  # nothing resent; the bad connection not reused
    wait_until(lambda: len(worker.access_lines()) == 3, 5, "three access lines")
    refusals = [line for line in worker.log_lines() if line["message"].startswith("refused an answer")]
    assert len(refusals) == 1
    assert f"127.0.0.1:{origin.port}" in refusals[0]["message"] and reason in refusals[0]["message"]
    assert [line["outcome"] for line in worker.access_lines()] == ["complete", "refused", "complete"]


# -- a body that breaks after the head was relayed: the client's connection is cut


BIG = 400_000  # over the size the worker reads whole: such an answer is streamed


@pytest.mark.parametrize("answer", [
    pytest.param(CHUNKED + b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n", id="bad chunk size mid-body"),
    pytest.param(CHUNKED + b"5\r\nhello\r\n5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n", id="overlong chunk extension"),
    pytest.param(CHUNKED + b"5\r\nhello, world\r\n0\r\n\r\n", id="chunk longer than its size"),
    pytest.param(Drip([CHUNKED + b"5\r\nhello\r\n", b"0\r\n\r\n"], 3), id="stall past the idle timeout"),
    pytest.param(Closing(CHUNKED + b"5\r\nhello\r\n"), id="closed before the last chunk"),
    pytest.param(Closing(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * BIG) + b"x" * BIG), id="closed short of Content-Length"),
])
def test_a_body_that_breaks_cuts_the_client_connection(scripted_worker, answer):
    origin, worker = scripted_worker(answer, answer)
    status, _, _, exit_status = fetch(worker.url + "/curl")
    assert (status, exit_status) == (200, 18)  # curl: "transfer closed with outstanding read data remaining"
    received = raw_get(worker.port)
    assert received.startswith(b"HTTP/1.1 200 ")
    head, _, body = received.partition(b"\r\n\r\n")
    if b"Content-Length" in head:
        assert len(body) < int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    else:
        assert b"Transfer-Encoding: chunked" in head and not body.endswith(b"0\r\n\r\n")
    wait_until(lambda: len(worker.access_lines()) == 2, 5, "two access lines")
    assert [line["outcome"] for line in worker.access_lines()] == ["truncated", "truncated"]
    assert worker.metric('agent_proxy_truncated_answers_total{direction="northbound"}') == 2
    assert len(origin.requests) == 2


def test_a_whole_chunked_answer_ends_with_its_last_chunk_and_content_length_beside_it_is_dropped(scripted_worker):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\nX-T: 1\r\n\r\n"
    _, worker = scripted_worker(answer, answer)
    status, headers, body, exit_status = fetch(worker.url + "/x")
    assert (status, body, exit_status) == (200, b"hello world", 0)
    assert "content-length" not in headers
    received = raw_get(worker.port)
    assert received.endswith(b"\r\nhello world\r\n0\r\n\r\n") and b"Content-Length" not in received
    wait_until(lambda: len(worker.access_lines()) == 2, 5, "two access lines")
    assert [line["outcome"] for line in worker.access_lines()] == ["complete", "complete"]


def test_one_byte_chunks_reach_the_client_as_few_chunks(scripted_worker):
    """An origin sending its body in one-byte chunks (a cheap way to make a relay work
    for each byte) gets it relayed whole, re-chunked as it was received, not byte by byte."""
    answer = CHUNKED + b"1\r\nx\r\n" * 50_000 + b"0\r\n\r\n"
    _, worker = scripted_worker(answer)
    received = raw_get(worker.port)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    body, chunks, after = dechunk(rest)
    assert (body, after) == (b"x" * 50_000, b"\r\n")  # the last chunk, no trailers
    assert chunks <= 100  # 300 KB arrive in a few receives; one chunk each, not 50,000


# -- retries only when safe


def test_a_post_on_a_reused_connection_the_origin_closed_is_never_sent_twice(scripted_worker):
    origin, worker = scripted_worker(OK_A, CLOSE, OK_B)
    assert fetch(worker.url + "/first")[2] == b"a"
    status, headers, _, _ = fetch(worker.url + "/command", "-X", "POST", "--data-binary", "reboot")
    assert (status, headers["x-agent-proxy-error"]) == (502, "upstream-closed")
    posts = [r for r in origin.requests if r.startswith(b"POST ")]
    assert len(posts) == 1 and posts[0].endswith(b"\r\n\r\nreboot")
    assert fetch(worker.url + "/after")[2] == b"b"


def test_a_get_on_a_reused_connection_the_origin_closed_is_sent_again_once(scripted_worker):
    origin, worker = scripted_worker(OK_A, CLOSE, OK_B)
    assert fetch(worker.url + "/first")[2] == b"a"
    assert fetch(worker.url + "/again")[:3:2] == (200, b"b")
    assert [r.split(b" ", 2)[:2] for r in origin.requests] == [[b"GET", b"/first"], [b"GET", b"/again"], [b"GET", b"/again"]]
    assert origin.connections == 2


# -- bytes past the end of an answer


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"


@pytest.mark.parametrize("method, first", [
    ("GET", [OK_A, SMUGGLED]),                                          # a whole answer more
    ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n", b"SMUGGLED"]),  # a body to a HEAD
    ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n", b"junk"]),             # a body to a 204
])
def test_bytes_after_an_answer_never_become_the_next_requests_answer(scripted_worker, method, first):
    """Every agent's requests share the upstream connections: what an origin sends after an
    answer, even 50 ms after it, is not the next request's answer, which may be another
    agent's. The connection it came on is dropped and the next request gets its own answer."""
    origin, worker = scripted_worker(Drip(first, 0.05), OK_B, OK_A)
    assert fetch(worker.url + "/first", "-X", method, *(["-I"] if method == "HEAD" else []))[0] in (200, 204)
    time.sleep(0.3)   # the extra bytes are in the idle connection's socket now
    assert fetch(worker.url + "/second")[:3:2] == (200, b"b")
    assert fetch(worker.url + "/third")[:3:2] == (200, b"a")
    assert [r.split(b" ", 2)[1] for r in origin.requests] == [b"/first", b"/second", b"/third"]


# -- an answer before the body was all sent (RFC 9112 9.5)


REFUSED = b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{\"error\":\"no\"}\n"
UPLOAD = 9_000_000   # under limits.max_body_bytes, over what the sockets between them hold


@pytest.mark.parametrize("hold", [0, 8], ids=["then closes", "then stops reading"])
def test_an_origin_refusing_an_upload_before_its_body_is_relayed_as_it_answered(scripted_worker, tmp_path, hold):
    """The origin answers 401 to the head of a large upload and reads no more of it: the
    agent gets that 401 (not a 502 for the closed connection, nor a 504 for a send that
    cannot finish), and the next request goes on a fresh connection."""
    origin, worker = scripted_worker(Early(REFUSED, hold), OK_B)
    upload = tmp_path / "upload"
    upload.write_bytes(b"u" * UPLOAD)
    started = time.monotonic()
    status, headers, body, _ = fetch(worker.url + "/upload", "-H", "Expect:", "--data-binary", f"@{upload}")
    assert (status, body) == (401, b'{"error":"no"}\n'), headers
    assert "x-agent-proxy-error" not in headers
    assert time.monotonic() - started < 7   # before the origin gives up holding (8 s): one send timeout (1 s) at most
    assert fetch(worker.url + "/after")[:3:2] == (200, b"b")
    assert origin.connections == 2


def test_an_interim_answer_during_an_upload_does_not_stop_it(scripted_worker, tmp_path):
    """A 100 Continue the origin sends unasked while the body comes is skipped: the body is
    sent whole and the final answer relayed."""
    origin, worker = scripted_worker(Drip([b"HTTP/1.1 100 Continue\r\n\r\n", OK_A], 0), OK_B)
    upload = tmp_path / "upload"
    upload.write_bytes(b"u" * UPLOAD)
    assert fetch(worker.url + "/upload", "-H", "Expect:", "--data-binary", f"@{upload}")[:3:2] == (200, b"a")
    assert len(origin.requests[0].partition(b"\r\n\r\n")[2]) == UPLOAD


# -- the head deadline


@pytest.mark.parametrize("drip, code", [
    (Drip([bytes([b]) for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 50], 0.1), "upstream-timeout"),
    (Drip([b"HTTP/1.1 102 Processing\r\n\r\n"] * 20, 0.3), "upstream-timeout"),
    (Drip([b"HTTP/1.1 103 Early Hints\r\n\r\n"] * 100, 0.05), "bad-answer"),
    # the head in time, then no first byte of the body within the idle timeout
    (Drip([CHUNKED, b"5\r\nhello\r\n0\r\n\r\n"], 5), "upstream-timeout"),
])
def test_an_origin_dripping_its_head_is_cut_at_the_head_deadline(scripted_worker, drip, code):
    _, worker = scripted_worker(drip)
    started = time.monotonic()
    status, headers, _, _ = fetch(worker.url + "/x")
    assert headers["x-agent-proxy-error"] == code and status == (504 if code == "upstream-timeout" else 502)
    assert time.monotonic() - started < 4  # the drip lasts 5 s or more


# -- a worker past 1,024 descriptors


def test_a_worker_past_1024_descriptors_reuses_an_idle_upstream_connection(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # the worker inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    origin = ScriptedOrigin([OK_A, OK_B, OK_A, OK_B])
    config = write_config(tmp_path, origin.url, upstream=TIMEOUTS, limits={"threads": 1, "max_in_flight": 64})
    proc = start_worker(config, tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) > 1100, 10, "the worker holding the idle connections")
        bodies = []
        for _ in range(4):  # each on the one upstream connection, polled before its reuse
            status, _, body, _ = fetch(f"http://127.0.0.1:{port}/x")
            bodies.append((status, body))
        assert bodies == [(200, b"a"), (200, b"b"), (200, b"a"), (200, b"b")]
        assert origin.connections == 1
    finally:
        for sock in idle:
            sock.close()
        assert proc.stop() == 0, proc.output()
        origin.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Traceback" not in proc.log_path.read_text()


# -- through the node front (HAProxy, TLS)


@pytest.fixture
def scripted_node(tmp_path):
    started = []

    def start(*script):
        origin = ScriptedOrigin(list(script))
        node = start_node(tmp_path / "node", origin.url, workers=1, balancers=[], limits={"threads": 1})
        started.append((origin, node))
        return origin, node

    yield start
    for origin, node in started:
        node.stop()
        origin.close()


def test_through_the_node_a_broken_body_cuts_the_client_and_a_post_is_never_replayed(scripted_node):
    origin, node = scripted_node(OK_A, CHUNKED + b"5\r\nhello\r\nzz\r\n", OK_B, CLOSE, OK_A)
    via = ("-k", "--http1.1")
    assert fetch(node.url + "/first", *via)[2] == b"a"
    status, _, body, exit_status = fetch(node.url + "/broken", *via)
    assert (status, exit_status) == (200, 18)
    assert fetch(node.url + "/warm", *via)[2] == b"b"
    status, headers, _, _ = fetch(node.url + "/command", *via, "-X", "POST", "--data-binary", "reboot")
    assert (status, headers["x-agent-proxy-error"]) == (502, "upstream-closed")
    assert len([r for r in origin.requests if r.startswith(b"POST ")]) == 1
    assert fetch(node.url + "/after", *via)[2] == b"a"
