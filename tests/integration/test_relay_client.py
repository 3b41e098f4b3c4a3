"""The relay's HTTP/1.1 client against an origin that answers exactly the bytes a test scripts.

Real sockets on loopback: a scripted origin accepts connections, reads each request
(head and Content-Length body) and sends the next answer of the script, so every framing
rule (length, chunked, until close, no body), interim answers, keep-alive reuse and the
retry after a stale keep-alive connection (only when it is safe) is seen as a caller of
``forward`` sees it. The hostile answers the parser refuses are tabled in
tests/unit/test_protocol.py; here are the ones that need a connection and a clock.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time

import pytest

from agent_proxy import relay
from tests.origin import CLOSE, Closing, Drip, ScriptedOrigin

@pytest.fixture
def scripted():
    made = []

    def start(*script) -> tuple[ScriptedOrigin, relay.Origin, relay.ConnectionCache]:
        origin = ScriptedOrigin(list(script))
        made.append(origin)
        return origin, relay.Origin("http", "127.0.0.1", origin.port, 5, 2, 2), relay.ConnectionCache(limit=8, per_thread=4)

    yield start
    for origin in made:
        origin.close()


def get(cache, origin, method="GET", target="/x", headers=(("Host", "o"),), body=b""):
    return relay.forward(cache, origin, method, target, list(headers), io.BytesIO(body), len(body))


def body_of(answer: relay.Answer) -> bytes:
    data = b"".join(answer.body)
    close = getattr(answer.body, "close", None)
    if close:
        close()
    return data


def test_a_content_length_answer_is_read_whole_and_the_connection_kept(scripted):
    server, origin, cache = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-One: 1\r\nX-One: 2\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nbye",
    )
    first = get(cache, origin)
    assert (first.status, first.reason, first.length, body_of(first)) == (200, "OK", 5, b"hello")
    assert first.headers == [("Content-Length", "5"), ("X-One", "1"), ("X-One", "2")]
    second = get(cache, origin)
    assert (second.status, body_of(second)) == (201, b"bye")
    assert server.connections == 1


def test_the_request_goes_out_as_given_with_its_body(scripted):
    server, origin, cache = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    get(cache, origin, "POST", "/a%2Fb?q=1", [("Host", "o"), ("X-Agent", "é")], b"payload")
    get(cache, origin, "POST", "/empty")
    assert server.requests[0] == (
        b"POST /a%2Fb?q=1 HTTP/1.1\r\nHost: o\r\nX-Agent: \xe9\r\nContent-Length: 7\r\n\r\npayload"
    )
    assert server.requests[1] == b"POST /empty HTTP/1.1\r\nHost: o\r\nContent-Length: 0\r\n\r\n"


def test_a_chunked_answer_is_unchunked_and_its_framing_headers_dropped(scripted):
    server, origin, cache = scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-End: 2\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer-Field: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    answer = get(cache, origin)
    assert answer.length is None
    assert answer.headers == [("X-End", "2")]
    assert body_of(answer) == b"hello world"
    assert body_of(get(cache, origin)) == b"ok"
    assert server.connections == 1


def test_an_answer_without_length_streams_until_the_origin_closes(scripted):
    server, origin, cache = scripted(
        Closing(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 300_000),
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    )
    answer = get(cache, origin)
    assert answer.length is None
    assert body_of(answer) == b"z" * 300_000
    get(cache, origin)
    assert server.connections == 2


def test_a_large_answer_streams_and_the_connection_is_kept_once_read(scripted):
    big = bytes(range(256)) * 4096  # 1 MiB
    server, origin, cache = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    answer = get(cache, origin)
    assert answer.length is None
    assert body_of(answer) == big
    assert body_of(get(cache, origin)) == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize("method, answer", [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
])
def test_answers_that_have_no_body_end_at_their_head(scripted, method, answer):
    server, origin, cache = scripted(answer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first = get(cache, origin, method)
    assert body_of(first) == b""
    assert body_of(get(cache, origin)) == b"ok"
    assert server.connections == 1


def test_interim_answers_are_skipped(scripted):
    _, origin, cache = scripted(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"
    )
    answer = get(cache, origin)
    assert (answer.status, body_of(answer)) == (200, b"done")
    assert answer.headers == [("Content-Length", "4")]


OK_A, OK_B = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"


@pytest.mark.parametrize("method, body", [("GET", b""), ("PUT", b"x" * 1000), ("DELETE", b"")])
def test_an_idempotent_request_on_a_reused_connection_the_origin_closed_is_sent_again_once(scripted, method, body):
    server, origin, cache = scripted(OK_A, CLOSE, OK_B)
    assert body_of(get(cache, origin)) == b"a"
    assert body_of(get(cache, origin, method, body=body)) == b"b"
    assert server.connections == 2
    assert server.requests[1] == server.requests[2]  # the same request, byte for byte
    assert server.requests[2].startswith(method.encode() + b" /x ")


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_command_on_a_reused_connection_the_origin_closed_is_never_sent_again(scripted, method):
    server, origin, cache = scripted(OK_A, CLOSE, OK_B)
    assert body_of(get(cache, origin)) == b"a"
    with pytest.raises(relay.OriginError, match="closed the connection before answering") as failed:
        get(cache, origin, method, body=b"run it once")
    assert failed.value.kind == "closed"
    assert len(server.requests) == 2
    assert server.requests[1].startswith(method.encode() + b" /x ")


def test_a_streamed_body_is_never_sent_again(scripted):
    big = b"p" * (relay.BUFFER_LIMIT + 1)  # streamed to the origin, not kept: cannot be resent
    server, origin, cache = scripted(OK_A, CLOSE, OK_B)
    assert body_of(get(cache, origin)) == b"a"
    with pytest.raises(relay.OriginError, match="closed the connection before answering"):
        get(cache, origin, "PUT", body=big)
    assert len(server.requests) == 2


def test_a_request_is_never_sent_a_third_time(scripted):
    server, origin, cache = scripted(OK_A, CLOSE, CLOSE, OK_B)
    assert body_of(get(cache, origin)) == b"a"
    with pytest.raises(relay.OriginError, match="closed the connection before answering"):
        get(cache, origin)
    assert (len(server.requests), server.connections) == (3, 2)


def test_a_request_whose_answer_began_is_never_sent_again(scripted):
    server, origin, cache = scripted(OK_A, Closing(b"HTTP/1.1 100 Continue\r\n\r\n"), OK_B)
    assert body_of(get(cache, origin)) == b"a"
    with pytest.raises(relay.OriginError, match="closed the connection after an interim answer") as failed:
        get(cache, origin)
    assert failed.value.kind == "bad-answer"
    assert len(server.requests) == 2


def test_a_request_on_a_fresh_connection_is_never_sent_again(scripted):
    server, origin, cache = scripted(CLOSE, OK_B)
    with pytest.raises(relay.OriginError, match="closed the connection before answering"):
        get(cache, origin)
    assert len(server.requests) == 1


def test_http_1_0_and_connection_close_are_not_kept(scripted):
    server, origin, cache = scripted(
        Closing(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na"),
        Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
    )
    assert [body_of(get(cache, origin)) for _ in range(3)] == [b"a", b"b", b"c"]
    assert server.connections == 3


def test_a_bad_answer_on_a_reused_connection_costs_the_pool_no_slot(scripted):
    server, origin, _ = scripted(OK_A, b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa5\r\n\r\nhello", OK_A, OK_B)
    cache = relay.ConnectionCache(limit=1)
    assert body_of(get(cache, origin)) == b"a"
    with pytest.raises(relay.OriginError, match="bad Content-Length"):
        get(cache, origin)
    assert cache.kept == 0
    assert body_of(get(cache, origin)) == b"a"
    assert body_of(get(cache, origin)) == b"b"  # on the connection the pool kept: it had a slot
    assert (server.connections, cache.kept) == (2, 1)


@pytest.mark.parametrize("answer, kind, says", [
    (b"SPDY/3 200 OK\r\n\r\n", "bad-answer", "not an HTTP/1.x status line"),
    (Closing(b"<html>HTTP/0.9</html>"), "bad-answer", "not an HTTP/1.x answer"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad-answer", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "bad-answer", "Content-Length values disagree: 5 and 6"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad-answer", "bad Content-Length '-1'"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "bad-answer", "upgrades are not relayed"),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bad-answer", "bare LF"),
    (Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"), "bad-answer", "closed the connection 5 bytes short of the body"),
    (Closing(b"HTTP/1.1 200 OK\r\nContent-Le"), "bad-answer", "closed the connection mid-head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "timeout", "sent no byte of the body for 2 s"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "timeout", "did not answer within 2 s"),
])
def test_answers_that_cannot_be_relayed_are_origin_errors_that_say_why(scripted, answer, kind, says):
    _, origin, cache = scripted(answer)
    with pytest.raises(relay.OriginError, match=says) as failed:
        get(cache, origin)
    assert failed.value.kind == kind


def test_an_origin_that_closes_without_answering_is_an_error_on_a_fresh_connection(scripted):
    _, origin, cache = scripted(CLOSE)
    with pytest.raises(relay.OriginError, match="closed the connection before answering$"):
        get(cache, origin)


@pytest.mark.parametrize("answer, says", [
    (Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 400_000), "600000 bytes short of the body"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 400_000, "sent no byte of the body for 2 s"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", "bad chunk size line b'zz'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello, world\r\n0\r\n\r\n", "a chunk longer than its size"),
    (Closing(b"HTTP/1.1 200 OK\r\n\r\nuntil close is complete"), None),
])
def test_a_stream_that_breaks_raises_and_drops_the_connection(scripted, answer, says):
    _, origin, cache = scripted(OK_A, answer)
    assert body_of(get(cache, origin)) == b"a" and cache.kept == 1  # the stream comes on a kept connection
    answer = get(cache, origin)
    pieces = []
    if says is None:
        pieces.extend(answer.body)
    else:
        with pytest.raises(relay.BrokenBody, match=says):
            pieces.extend(answer.body)
        assert 0 < len(b"".join(pieces)) < 1_000_000
    answer.body.close()
    assert cache.take(origin) is None and cache.kept == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_origin_that_accepts_and_never_answers_times_out(tmp_path, scheme):
    from agent_proxy.tlsutil import self_signed

    cert, key = self_signed("localhost", ["localhost", "127.0.0.1"])
    (tmp_path / "origin.crt").write_bytes(cert)
    (tmp_path / "origin.key").write_bytes(key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "origin.crt", tmp_path / "origin.key")
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept_and_say_nothing():
        conn, _ = listener.accept()
        held.append(server_context.wrap_socket(conn, server_side=True) if scheme == "https" else conn)

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    context = relay.client_context(str(tmp_path / "origin.crt")) if scheme == "https" else None
    origin = relay.Origin(scheme, "127.0.0.1", listener.getsockname()[1], 5, 0.5, 0.5, context)
    started = time.monotonic()
    with pytest.raises(relay.OriginError, match="did not answer within 0.5 s") as failed:
        get(relay.ConnectionCache(limit=1), origin)
    assert failed.value.kind == "timeout"
    assert time.monotonic() - started < 4
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("script, kind, says", [
    # a head dripped a byte every 0.1 s: each receive is quick, the head never done
    (Drip([bytes([b]) for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 100], 0.1), "timeout", "did not answer within 1 s"),
    # 102 Processing every 0.3 s: under the interim bound when the deadline passes
    (Drip([b"HTTP/1.1 102 Processing\r\n\r\n"] * 30, 0.3), "timeout", "did not answer within 1 s"),
    # 103 every 0.05 s: more interim answers than are ever skipped
    (Drip([b"HTTP/1.1 103 Early Hints\r\n\r\n"] * 100, 0.05), "bad-answer", "more than 8 interim"),
])
def test_the_head_has_one_deadline_however_the_origin_drips_it(script, kind, says):
    server = ScriptedOrigin([script])
    try:
        origin = relay.Origin("http", "127.0.0.1", server.port, 5, 1, 5)
        started = time.monotonic()
        with pytest.raises(relay.OriginError, match=says) as failed:
            get(relay.ConnectionCache(limit=1), origin)
        assert failed.value.kind == kind
        assert time.monotonic() - started < 3  # the drip would last 3 s or more
    finally:
        server.close()


def test_a_body_may_take_longer_than_the_head_deadline_while_it_keeps_coming():
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"] + [b"1\r\nx\r\n"] * 8 + [b"0\r\n\r\n"]
    server = ScriptedOrigin([Drip(pieces, 0.2)])
    try:
        origin = relay.Origin("http", "127.0.0.1", server.port, 5, 1, 1)
        assert body_of(get(relay.ConnectionCache(limit=1), origin)) == b"x" * 8
    finally:
        server.close()


def test_content_length_beside_chunked_is_dropped_and_the_body_framed_by_the_chunks(scripted):
    _, origin, cache = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"b\r\nhello world\r\n0\r\n\r\n"
    )
    answer = get(cache, origin)
    assert answer.headers == []
    assert body_of(answer) == b"hello world"
