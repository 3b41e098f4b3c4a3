"""The relay's answer grammar (RFC 9112) against hostile answers: a table, then random ones.

Each answer is read as the relay reads it from an origin: its bytes are what the
connection has received, and the origin has closed. ``read_answer`` returns the final
head and the body, or raises; the only exception a malformed answer may raise is
``ProtocolError`` (one line saying what is wrong), and the only other outcome is
``ClosedEarly`` for an origin that sent nothing at all.
"""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_proxy import relay
from agent_proxy.relay import ProtocolError

OK = b"HTTP/1.1 200 OK\r\n"
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
FIELD_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\Z")


def read_answer(data: bytes, method: str = "GET") -> tuple[relay.Head, bytes]:
    """The final head and the whole body of ``data``, as received from an origin that then closed."""
    ours, theirs = socket.socketpair()
    theirs.close()
    conn = relay.Connection(ours, 1.0)
    conn.buffer += data
    try:
        head = relay.answer_head(conn)
        framing = head.framing(method)
        if framing == relay.LENGTH:
            body = conn.read_exactly(head.length)
        elif framing == relay.CHUNKED:
            body = b"".join(conn.unchunk())
        elif framing == relay.UNTIL_CLOSE:
            body = b"".join(conn.until_close())
        else:
            body = b""
        return head, body
    finally:
        conn.close()


HOSTILE = {
    # the status line
    "HTTP/0.9 (a body, no head)": (b"<html>hello</html>", "HTTP/0.9 or garbage"),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "HTTP/0.9 or garbage"),
    "lower-case version": (b"http/1.1 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "HTTP/2.0": (b"HTTP/2.0 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "HTTP/1.2": (b"HTTP/1.2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "four-digit status": (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "two-digit status": (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "status below 100": (b"HTTP/1.1 099 Low\r\n\r\n", "not an HTTP/1.x status line"),
    "status 600": (b"HTTP/1.1 600 High\r\n\r\n", "not an HTTP/1.x status line"),
    "non-ASCII digits in the status": ("HTTP/1.1 ٢٠٠ OK\r\n\r\n".encode(), "not an HTTP/1.x status line"),
    "two spaces before the status": (b"HTTP/1.1  200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "tab before the status": (b"HTTP/1.1\t200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "CR in the reason phrase": (b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n", "bare LF or CR"),
    "NUL in the reason phrase": (b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x status line"),
    "blank line before the status": (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    "101 Switching Protocols": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
    "nine interim answers": (b"HTTP/1.1 103 Early Hints\r\n\r\n" * 9 + OK + b"Content-Length: 0\r\n\r\n", "more than 8 interim"),
    "closed after an interim answer": (b"HTTP/1.1 100 Continue\r\n\r\n", "closed the connection after an interim answer"),
    "closed mid-head": (OK + b"Content-Len", "closed the connection mid-head"),
    # line ends
    "bare LF": (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF"),
    "bare LF in one line": (OK + b"X-A: 1\nContent-Length: 0\r\n\r\n", "bare LF"),
    "bare CR": (OK + b"X-A: 1\rContent-Length: 0\r\n\r\n", "bare LF or CR"),
    # header lines
    "obs-fold": (OK + b"X-Long: one\r\n two\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
    "obs-fold by a tab": (OK + b"X-Long: one\r\n\ttwo\r\n\r\n", "obs-fold"),
    "header without colon": (OK + b"X-No-Colon\r\n\r\n", "without a colon"),
    "space before the colon": (OK + b"Content-Length : 0\r\n\r\n", "not a token"),
    "empty header name": (OK + b": value\r\n\r\n", "not a token"),
    "non-ASCII header name": (OK + "Größe: 1\r\n".encode() + b"\r\n", "not a token"),
    "NUL in a header value": (OK + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", "control character in the value of X-A"),
    "DEL in a header value": (OK + b"X-A: a\x7fb\r\n\r\n", "control character in the value of X-A"),
    "escape in a header value": (OK + b"X-A: \x1b[31mred\r\n\r\n", "control character in the value of X-A"),
    "CR in a header value": (OK + b"X-A: a\rb\r\n\r\n", "bare LF or CR"),
    "1 MiB header line": (OK + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", "head over 64 KiB"),
    "1 MiB header line, unfinished": (OK + b"X-Big: " + b"a" * (1 << 20), "head over 64 KiB"),
    "10,000 headers": (OK + b"A: b\r\n" * 10_000 + b"\r\n", "more than 100 header lines"),
    # Content-Length
    "Content-Length: abc": (OK + b"Content-Length: abc\r\n\r\n", "bad Content-Length 'abc'"),
    "Content-Length: -1": (OK + b"Content-Length: -1\r\n\r\n", "bad Content-Length '-1'"),
    "Content-Length: +5": (OK + b"Content-Length: +5\r\n\r\nhello", "bad Content-Length"),
    "Content-Length: 0x10": (OK + b"Content-Length: 0x10\r\n\r\n", "bad Content-Length"),
    "Content-Length: 1e3": (OK + b"Content-Length: 1e3\r\n\r\n", "bad Content-Length"),
    "Content-Length: 5 5": (OK + b"Content-Length: 5 5\r\n\r\nhello", "bad Content-Length"),
    "Content-Length empty": (OK + b"Content-Length: \r\n\r\n", "bad Content-Length"),
    "Content-Length empty list item": (OK + b"Content-Length: 5,\r\n\r\nhello", "bad Content-Length"),
    "Content-Length of 19 digits": (OK + b"Content-Length: 1000000000000000000\r\n\r\n", "bad Content-Length"),
    "Content-Length of 5,000 digits": (OK + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad Content-Length"),
    "Content-Length in Arabic-Indic digits": (OK + "Content-Length: ٥\r\n\r\n".encode(), "bad Content-Length"),
    "Content-Length: superscript two": (OK + b"Content-Length: \xb2\r\n\r\nab", "bad Content-Length"),
    "Content-Length in full-width digits": (OK + "Content-Length: ５\r\n\r\n".encode(), "bad Content-Length"),
    "Content-Length values disagree": (OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "disagree: 5 and 6"),
    "Content-Length list disagrees": (OK + b"Content-Length: 5, 6\r\n\r\nhello!", "disagree: 5 and 6"),
    "Content-Length: abc next to chunked": (
        OK + b"Content-Length: abc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad Content-Length 'abc'"),
    "body short of its Content-Length": (OK + b"Content-Length: 10\r\n\r\nshort", "5 bytes short of the body"),
    # Transfer-Encoding
    "Transfer-Encoding: gzip": (OK + b"Transfer-Encoding: gzip\r\n\r\nxx", "other than chunked"),
    "Transfer-Encoding: gzip, chunked": (OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "other than chunked"),
    "chunked twice": (OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "other than chunked"),
    "chunked on HTTP/1.0": (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "other than chunked"),
    # chunks
    "negative chunk size": (OK + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", "bad chunk size line b'-5'"),
    "chunk size 0x5": (OK + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "chunk size of 17 digits": (OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", "bad chunk size line"),
    "chunk size in Arabic-Indic digits": (OK + "Transfer-Encoding: chunked\r\n\r\n٥\r\nhello\r\n0\r\n\r\n".encode(), "bad chunk size line"),
    "chunk size with a leading space": (OK + b"Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "empty chunk size": (OK + b"Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n", "bad chunk size line b''"),
    "chunk size ended by a bare LF": (OK + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", "bare LF"),
    "chunk extension over 4 KiB": (
        OK + b"Transfer-Encoding: chunked\r\n\r\n5;x=" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n", "over 4096 bytes"),
    "chunk extension without a name": (OK + b"Transfer-Encoding: chunked\r\n\r\n5;=x\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "chunk extension with a NUL": (OK + b"Transfer-Encoding: chunked\r\n\r\n5;a=\x00\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),
    "chunk extension, unterminated quote": (OK + b'Transfer-Encoding: chunked\r\n\r\n5;a="x\r\nhello\r\n0\r\n\r\n', "bad chunk size line"),
    "chunk longer than its size": (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello, world\r\n0\r\n\r\n", "longer than its size"),
    "chunk data ended by a bare LF": (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", "longer than its size"),
    "chunk shorter than its size": (OK + b"Transfer-Encoding: chunked\r\n\r\na\r\nhello", "5 bytes short of the body"),
    "no last chunk": (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "closed the connection in a chunk size line"),
    "trailer without a colon": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nNoColon\r\n\r\n", "malformed trailer line"),
    "obs-fold in a trailer": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nA: b\r\n c\r\n\r\n", "malformed trailer line"),
    "NUL in a trailer": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nA: \x00\r\n\r\n", "malformed trailer line"),
    "101 trailer lines": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\n" + b"A: b\r\n" * 101 + b"\r\n", "trailers over 100 lines"),
    "a 1 MiB trailer": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nA: " + b"b" * (1 << 20) + b"\r\n\r\n", "over 65536 bytes"),
    "no end of the trailers": (OK + b"Transfer-Encoding: chunked\r\n\r\n0\r\nA: b\r\n", "closed the connection in a trailer line"),
}


@pytest.mark.parametrize("data, says", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_answer_is_one_protocol_error_that_says_what_is_wrong(data, says):
    with pytest.raises(ProtocolError) as refused:
        read_answer(data)
    message = str(refused.value)
    assert says in message
    assert "\n" not in message and len(message) < 200


ACCEPTED = {
    "Content-Length": (OK + b"Content-Length: 5\r\nX-A: 1\r\n\r\nhello", 200, [("Content-Length", "5"), ("X-A", "1")], b"hello"),
    "no reason phrase": (b"HTTP/1.1 204\r\n\r\n", 204, [], b""),
    "empty reason phrase": (b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", 200, [("Content-Length", "0")], b""),
    "obs-text in the reason and a value": (
        b"HTTP/1.1 200 Gr\xfc\xdfe\r\nX-A: caf\xe9\r\nContent-Length: 0\r\n\r\n", 200,
        [("X-A", "caf\xe9"), ("Content-Length", "0")], b""),
    "whitespace around a value trimmed, inside kept": (
        OK + b"X-A: \t a \t b \t\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n", 200,
        [("X-A", "a \t b"), ("X-Empty", ""), ("Content-Length", "0")], b""),
    "Content-Length repeated, agreeing": (
        OK + b"Content-Length: 5\r\nContent-Length: 5, 05\r\n\r\nhello", 200,
        [("Content-Length", "5"), ("Content-Length", "5, 05")], b"hello"),
    "Content-Length with leading zeros": (OK + b"Content-Length: 007\r\n\r\nabcdefg", 200, [("Content-Length", "007")], b"abcdefg"),
    "chunked with extensions and trailers": (
        OK + b"Transfer-Encoding: Chunked\r\n\r\n5;a=1;b=\"q \\\" x\"\r\nhello\r\n6 ; c\r\n world\r\n0\r\nX-T: 1\r\n\r\n", 200,
        [("Transfer-Encoding", "Chunked")], b"hello world"),
    "Content-Length beside chunked: the chunks frame it": (
        OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n", 200,
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")], b"hello world"),
    "chunk size in upper-case hex": (OK + b"Transfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n", 200,
                                      [("Transfer-Encoding", "chunked")], b"0123456789"),
    "eight interim answers": (
        b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 7 + OK + b"Content-Length: 2\r\n\r\nok",
        200, [("Content-Length", "2")], b"ok"),
    "until close": (b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nall of it", 200, [("X-A", "1")], b"all of it"),
    "a hundred headers": (OK + b"A: b\r\n" * 99 + b"Content-Length: 0\r\n\r\n", 200, [("A", "b")] * 99 + [("Content-Length", "0")], b""),
}


@pytest.mark.parametrize("data, status, headers, body", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_a_well_formed_answer_is_read(data, status, headers, body):
    head, received = read_answer(data)
    assert (head.status, head.headers, received) == (status, headers, body)


def test_a_chunked_answer_is_relayed_without_any_content_length():
    head, _ = read_answer(ACCEPTED["Content-Length beside chunked: the chunks frame it"][0])
    assert relay.end_to_end(head, head.framing("GET")) == []


def test_agreeing_content_lengths_are_relayed_as_one():
    head, _ = read_answer(ACCEPTED["Content-Length repeated, agreeing"][0])
    assert relay.end_to_end(head, head.framing("GET")) == [("Content-Length", "5")]


# -- random answers: only ever a valid head or ProtocolError


VALID = [
    OK + b"Content-Length: 5\r\nX-A: 1\r\n\r\nhello",
    OK + b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5;a=\"b\"\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 404 Not Found\r\nContent-Length: 2, 2\r\n\r\nno",
    b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil close",
    OK + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
]
# Bytes the grammar cares about, spliced in more often than chance would.
SPLICES = [b"\r", b"\n", b"\r\n", b"\x00", b":", b" ", b"\t", b";", b",", b"-", b"\x7f", b"\xd9\xa5", b"\xb2", b"0", b"f", b"HTTP/1.1 "]


def assert_valid(head: relay.Head, body: bytes) -> None:
    assert head.version in ("HTTP/1.0", "HTTP/1.1")
    assert 200 <= head.status <= 599
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", head.reason)
    for name, value in head.headers:
        assert TOKEN.match(name), name
        assert FIELD_VALUE.match(value), value
    lengths = {int(item) for name, value in head.headers if name.lower() == "content-length" for item in value.split(",")}
    assert all(re.fullmatch(r"[0-9]+(?:[ \t]*,[ \t]*[0-9]+)*", value, re.ASCII)
               for name, value in head.headers if name.lower() == "content-length")
    assert lengths == ({head.length} if head.length is not None else set())
    assert isinstance(body, bytes)


def read_or_refuse(data: bytes) -> None:
    try:
        head, body = read_answer(data)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    except relay.ClosedEarly:
        assert data == b""
        return
    assert_valid(head, body)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_a_valid_answer_or_a_protocol_error(data):
    read_or_refuse(data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_after_a_status_line_are_a_valid_answer_or_a_protocol_error(data):
    read_or_refuse(OK + data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "splice"]))
        if action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif action == "replace":
            data[at:at + 1] = bytes([draw(st.integers(0, 255))])
        else:
            data[at:at] = draw(st.sampled_from(SPLICES))
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutations_of_valid_answers_are_a_valid_answer_or_a_protocol_error(data):
    read_or_refuse(data)


TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALUE_CHARS = "".join(map(chr, [9, *range(0x20, 0x7F), *range(0x80, 0x100)]))


@FUZZ
@given(
    st.lists(st.tuples(
        st.text(TCHARS, min_size=1, max_size=12).filter(lambda n: n.lower() not in ("content-length", "transfer-encoding")),
        st.text(VALUE_CHARS, max_size=20).map(lambda v: v.strip(" \t")),
    ), max_size=10),
    st.binary(max_size=50),
)
def test_any_head_in_the_grammar_is_read_back_as_sent(headers, body):
    data = OK + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    head, received = read_answer(data)
    assert head.headers[:-1] == headers
    assert received == body


NUMBERS = (
    st.text(st.sampled_from("0123456789aAfF\xb2\xb3\xb9"), min_size=1, max_size=6)  # digits and look-alikes
    | st.text(st.sampled_from("0123456789abcdefABCDEF+-_ ,;=\"\t"), max_size=8)
    | st.text(st.characters(max_codepoint=255), max_size=8)
)


@FUZZ
@given(NUMBERS, NUMBERS)
def test_random_content_lengths_and_chunk_sizes_are_read_or_a_protocol_error(length, size):
    # latin-1: each character one byte (the superscript digits pass str.isdigit())
    read_or_refuse(OK + b"Content-Length: " + length.encode("latin-1") + b"\r\n\r\nhello")
    read_or_refuse(OK + b"Transfer-Encoding: chunked\r\n\r\n" + size.encode("latin-1") + b"\r\nhello\r\n0\r\n\r\n")


# -- chunks handed on: what has arrived goes on together, and nothing waits


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\nX-T: 1\r\n\r\n"


def test_chunks_already_received_are_handed_on_in_one_piece():
    ours, theirs = socket.socketpair()
    theirs.close()
    conn = relay.Connection(ours, 1.0)
    conn.buffer += chunked(*[b"x"] * 10_000)
    try:
        assert list(conn.unchunk()) == [b"x" * 10_000]
    finally:
        conn.close()


@pytest.mark.parametrize("data, before", [
    (b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n5\r\nhello, world\r\n0\r\n\r\n", b"hellohello"),  # the size's worth, then no CRLF
    (b"5\r\nhello\r\n0\r\nNoColon\r\n\r\n", b"hello"),
], ids=["bad size line", "chunk longer than its size", "bad trailer"])
def test_the_data_before_a_fault_is_handed_on_before_the_error(data, before):
    """As chunk by chunk: the client gets the head and the bytes before the fault, then
    its connection is cut, whether or not the fault came in the same receive."""
    ours, theirs = socket.socketpair()
    theirs.close()
    conn = relay.Connection(ours, 1.0)
    conn.buffer += data
    pieces, got = conn.unchunk(), []
    try:
        with pytest.raises(ProtocolError):
            for piece in pieces:
                got.append(piece)
        assert b"".join(got) == before
    finally:
        conn.close()


BODY = chunked(b"ab", b"cd", b"efghij", b"k")


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_every_byte_received_is_handed_on_before_waiting_for_more(cut):
    """The origin has sent the answer up to ``cut`` and waits: what came before the cut
    is handed on without a wait (a wait would time out), then the rest follows."""
    # the body's bytes before the cut: those of each chunk's data that lie before it
    before = b"".join(match.group(1)[:max(0, cut - match.start(1))]
                      for match in re.finditer(rb"\r\n([a-k]+)\r\n", BODY))
    ours, theirs = socket.socketpair()
    conn = relay.Connection(ours, 0.5)
    conn.buffer += BODY[:cut]
    pieces = conn.unchunk()
    try:
        got = b""
        while len(got) < len(before):
            got += next(pieces)  # socket.timeout here: a byte that had arrived was held back
        assert got == before
        theirs.sendall(BODY[cut:])
        theirs.close()
        assert got + b"".join(pieces) == b"abcdefghijk"
        assert not conn.buffer  # the trailers were read to their end
    finally:
        conn.close()
