"""Forwarding one request to an origin (the upstream or an agent) and relaying the answer.

HTTP/1.1 on persistent connections, one set per worker thread: a waitress thread handles
one request from start to end, so a thread's connection is never shared. The client is
this module's own, not ``http.client``: relaying a 200-byte answer from nginx, the
standard library costs ~88 us of CPU per request on the target machines and this ~50
(one thread in a loop, the two in alternating rounds); in a worker relaying at full
speed that was a tenth of all its CPU. It does what a relay needs and no more: the
request goes out in one send (head and a small body together), the answer's head is
parsed from one buffer, and its body is framed by the rules of RFC 9112 section 6.3 (no
body for HEAD, 1xx, 204 and 304; chunked; Content-Length; otherwise until the origin
closes). Bodies pass through as bytes: small answers are read whole (cheaper than
streaming them), large ones stream in 256 KiB reads; a chunked body goes on as it is
received, the chunks of one receive in one piece. Nothing is decoded, nothing is
decompressed, redirects are relayed as they are.

The answer is read by one grammar, RFC 9112's, and strictly: origins and agents may be
hostile. Anything outside it (a bad status line, a header name that is not a token, a
control character in a value, an obsolete line folding, a bare LF, Content-Length
values that are not ASCII digits or disagree, a chunk size that is not ASCII hex,
oversized chunk extensions or trailers, HTTP/0.9, 101) raises ``ProtocolError``: before
the head is relayed the caller answers 502, after it ``StreamedBody`` raises
``BrokenBody`` so that the client's connection is cut, never ended as if complete.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urlsplit

CHUNK = 256 * 1024
# One receive while reading a head or a small body. Larger receives cost more than they
# save: a 256 KiB buffer is an mmap and a munmap per receive (measured: ~30 us a request).
RECEIVE = 64 * 1024
MAX_HEAD = 64 * 1024  # status line and headers of one answer; also the trailers of one
MAX_HEADERS = 100     # header lines of one answer; also trailer lines
MAX_INTERIM = 8       # 1xx answers skipped before the final one
MAX_CHUNK_LINE = 4096  # a chunk size with its extensions
# Answers up to this size are read whole; larger ones are streamed.
BUFFER_LIMIT = 256 * 1024
# A receive timeout is set again only when it would change by more than this: the head
# deadline of a request on a warm connection then costs no system call (it may be
# overrun by this much).
TIMEOUT_SLACK = 0.05

# RFC 9110 9.2.2: only these may be sent again after a connection failed under them.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones that describe this hop's framing.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
        "expect",
    }
)

# What a send or receive that ran out of time raises (see Origin.connect).
TIMED_OUT = (socket.timeout, BlockingIOError)

# How an answer's body is delimited.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "close"

# -- the grammar (RFC 9112 sections 4, 5 and 7; RFC 9110 5.5 and 5.6)
# Byte classes are spelt out: str.isdigit() and int() accept far more than ASCII digits.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"  # HTAB, SP, VCHAR, obs-text: no CR, LF, NUL or other controls
_STATUS_LINE = rb"HTTP/1\.[01] [1-5][0-9][0-9](?: " + _FIELD_VALUE + rb")?"
_FIELD_LINE = _TCHAR + rb"+:" + _FIELD_VALUE
# The whole head in one match: the common case costs one regex pass in C.
_HEAD = re.compile(_STATUS_LINE + rb"(?:\r\n" + _FIELD_LINE + rb")*")
_STATUS = re.compile(_STATUS_LINE)
_FIELD = re.compile(_FIELD_LINE)
_NAME = re.compile(_TCHAR + rb"+")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
# Whole interim answers, which an origin may send while a body is still coming.
_INTERIM_HEAD = re.compile(rb"HTTP/1\.[01] 1[0-9][0-9][^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n")
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR + rb"+|" + _QUOTED + rb"))?)*"
)
_DIGITS = "0123456789"
_MAX_LENGTH_DIGITS = 18  # 10**18 bytes; longer is nonsense (and int() of 4,300 digits raises)


class OriginError(Exception):
    """The origin failed us before its answer's head was relayed.

    ``kind``: ``unreachable`` (no connection), ``timeout`` (no connection or no head in
    time), ``closed`` (closed without a byte of an answer), ``bad-answer`` (an answer
    that breaks the protocol, see ProtocolError).
    """

    def __init__(self, message: str, kind: str = "unreachable"):
        super().__init__(message)
        self.kind = kind


class ProtocolError(Exception):
    """The origin's answer is not HTTP/1.x that can be relayed; the message says why, in one line."""


class ClosedEarly(Exception):
    """The origin closed the connection before sending a byte of its answer."""


class BrokenBody(OriginError):
    """The answer's body broke off (bad framing, a stall, an early close) after its head was read."""


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host, port, TLS and timeouts.

    ``head_timeout``: connect, send and the answer's head, in total; ``idle_timeout``:
    the longest wait for the next bytes of a body (and for each send).
    """

    scheme: str
    host: str
    port: int
    connect_timeout: float
    head_timeout: float
    idle_timeout: float
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def from_url(cls, url: str, timeouts: tuple[float, float, float], ssl_context: ssl.SSLContext | None = None) -> Origin:
        """The origin an http(s) URL names, its port defaulted by the scheme; ``timeouts``:
        connect, head and idle (``config.Upstream.timeouts()``)."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, *timeouts, ssl_context)

    @property
    def bracketed_host(self) -> str:
        """The host as a URL or Host header writes it (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.bracketed_host if self.port == default else f"{self.bracketed_host}:{self.port}"

    def connect(self, deadline: float) -> Connection:
        wait = min(self.connect_timeout, deadline - time.monotonic())
        if wait <= 0:
            raise socket.timeout()
        sock = socket.create_connection((self.host, self.port), timeout=wait)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            else:
                # The kernel keeps the timeouts (SO_RCVTIMEO, SO_SNDTIMEO) of a blocking
                # socket: a Python socket timeout polls before every send and receive, two
                # more system calls and GIL round trips per request. A call that runs out of
                # time fails with EAGAIN. (Not under TLS: the ssl module retries EAGAIN on a
                # blocking socket for ever.)
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.idle_timeout))
            conn = Connection(sock, self.idle_timeout)
            conn.wait_at_most(self.idle_timeout, exactly=True)
        except BaseException:
            sock.close()
            raise
        return conn


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def client_context(ca_file: str | None, verify: bool = True, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


class Connection:
    """One connection to an origin and the bytes received on it but not yet consumed."""

    __slots__ = ("sock", "buffer", "counted", "idle", "timeout", "deadline")

    def __init__(self, sock: socket.socket, idle: float):
        self.sock = sock
        self.idle = idle      # the receive timeout outside a head: the longest pause in a body
        self.buffer = bytearray()
        self.counted = False  # counted against the cache's limit
        self.timeout = 0.0    # the receive timeout set on the socket
        self.deadline = None  # while a head is read: when it must have arrived (monotonic)

    def wait_at_most(self, seconds: float, exactly: bool = False) -> None:
        """Let each receive wait at most ``seconds`` (changed only if off by TIMEOUT_SLACK)."""
        if seconds <= 0:
            raise socket.timeout("the deadline has passed")
        if not exactly and abs(seconds - self.timeout) <= TIMEOUT_SLACK:
            return
        self.timeout = seconds
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    def fill(self) -> int:
        """Receive what the origin has sent (at least a byte); 0 when it has closed."""
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or abs(remaining - self.timeout) > TIMEOUT_SLACK:
                self.wait_at_most(remaining)
        elif self.timeout != self.idle:
            self.wait_at_most(self.idle, exactly=True)
        data = self.sock.recv(RECEIVE)
        self.buffer += data
        return len(data)

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes: from the buffer if it holds any, else from one receive."""
        buffer = self.buffer
        if buffer:
            data = bytes(buffer[:size])
            del buffer[:size]
            return data
        if self.timeout != self.idle:
            self.wait_at_most(self.idle, exactly=True)
        return self.sock.recv(size)

    def stream(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes, in pieces of at most CHUNK."""
        while size:
            data = self.take(min(CHUNK, size))
            if not data:
                raise ProtocolError(f"the origin closed the connection {size} bytes short of the body")
            size -= len(data)
            yield data

    def unchunk(self) -> Iterator[bytes]:
        """A chunked body's data, up to and including its last chunk and trailers (dropped).

        Chunks already received are handed on together, in one piece, just before the
        next wait for the origin: each piece costs the server a write, and an origin
        sending one-byte chunks would otherwise cost one per chunk. No byte is held back
        while waiting, nor when the framing breaks: what came before the fault goes on
        first, as it would have chunk by chunk.
        """
        pending = bytearray()
        try:
            yield from self._unchunk(pending)
        except ProtocolError:
            if pending:
                yield bytes(pending)
            raise

    def _unchunk(self, pending: bytearray) -> Iterator[bytes]:
        # ``pending`` holds only bytes taken from the buffer: it is handed on before every
        # step that may receive, so it never outgrows what one receive left there.
        buffer = self.buffer
        while True:
            if pending and buffer.find(b"\n", 0, MAX_CHUNK_LINE + 2) < 0:
                yield bytes(pending)  # the next size line is not here yet
                pending.clear()
            line = self.read_line(MAX_CHUNK_LINE, "a chunk size line")
            match = _CHUNK_LINE.fullmatch(line)
            if match is None:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}")
            size = int(match.group(1), 16)
            if size and len(buffer) >= size + 2:  # the whole chunk is here
                pending += buffer[:size]
                if buffer[size:size + 2] != b"\r\n":
                    raise ProtocolError("a chunk longer than its size (no CRLF after its data)")
                del buffer[:size + 2]
                continue
            if pending:  # what follows may wait for the origin
                yield bytes(pending)
                pending.clear()
            if size == 0:
                self.skip_trailers()
                return
            yield from self.stream(size)
            if self.read_exactly(2) != b"\r\n":
                raise ProtocolError("a chunk longer than its size (no CRLF after its data)")

    def skip_trailers(self) -> None:
        """Read the trailer section (RFC 9112 7.1.2) and drop it: trailers are not relayed."""
        lines, size = 0, 0
        while line := self.read_line(MAX_HEAD, "a trailer line"):
            lines += 1
            size += len(line)
            if lines > MAX_HEADERS or size > MAX_HEAD:
                raise ProtocolError(f"trailers over {MAX_HEADERS} lines or 64 KiB")
            if _FIELD.fullmatch(line) is None:
                raise ProtocolError(f"a malformed trailer line {line[:40]!r}")

    def until_close(self) -> Iterator[bytes]:
        while data := self.take(CHUNK):
            yield data

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise ProtocolError(f"the origin closed the connection {size - len(self.buffer)} bytes short of the body")
        return self.take(size)

    def read_line(self, limit: int, what: str) -> bytes:
        """One line ended by CRLF (without it), at most ``limit`` bytes; a bare LF is an error."""
        buffer = self.buffer
        while (end := buffer.find(b"\n", 0, limit + 2)) < 0:
            if len(buffer) > limit + 1:
                raise ProtocolError(f"{what} over {limit} bytes")
            if not self.fill():
                raise ProtocolError(f"the origin closed the connection in {what}")
        if end == 0 or buffer[end - 1] != 13:
            raise ProtocolError(f"{what} ended by a bare LF")
        line = bytes(buffer[:end - 1])
        del buffer[:end + 1]
        return line

    def read_head(self) -> bytes:
        """The status line and headers of the next answer, without the blank line."""
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if buffer:  # all head so far: refuse at once what can never become one
                if buffer[:5] != b"HTTP/"[:len(buffer)]:
                    raise ProtocolError(f"not an HTTP/1.x answer (HTTP/0.9 or garbage): {bytes(buffer[:40])!r}")
                if buffer.count(b"\n") != buffer.count(b"\r\n"):
                    raise ProtocolError("a line of the head ended by a bare LF")
                if len(buffer) > MAX_HEAD:
                    raise ProtocolError("an answer head over 64 KiB")
            try:
                received = self.fill()
            except ConnectionResetError:
                if buffer:
                    raise ProtocolError("the origin reset the connection mid-head") from None
                raise
            if not received:
                if buffer:
                    raise ProtocolError("the origin closed the connection mid-head")
                raise ClosedEarly()
        if end > MAX_HEAD:
            raise ProtocolError("an answer head over 64 KiB")
        head = bytes(buffer[:end])
        del buffer[:end + 4]
        return head

    def close(self) -> None:
        self.sock.close()


@dataclass
class Head:
    """An answer's status line and headers, with what its framing depends on."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]     # as sent: order and repeats kept
    connection: frozenset[str]         # tokens of the Connection header, lowercase
    length: int | None                 # Content-Length, if given (and agreed)
    chunked: bool                      # Transfer-Encoding: chunked

    @property
    def keep_alive(self) -> bool:
        if "close" in self.connection:
            return False
        return self.version == "HTTP/1.1" or "keep-alive" in self.connection

    def framing(self, method: str) -> str:
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            return NO_BODY
        if self.chunked:  # RFC 9112 6.3: chunked wins over any Content-Length
            return CHUNKED
        return LENGTH if self.length is not None else UNTIL_CLOSE


def parse_head(head: bytes) -> Head:
    """Parse a status line and headers; raise ProtocolError for what cannot be relayed."""
    if head.count(b"\r\n") > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header lines")
    if _HEAD.fullmatch(head) is None:
        raise ProtocolError(_what_is_wrong(head))
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    headers: list[tuple[str, str]] = []
    connection: set[str] = set()
    length = None
    transfer_encoding = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == "connection":
            connection.update(t.strip(" \t").lower() for t in value.split(","))
        elif lower == "content-length":
            length = _content_length(value, length)
        elif lower == "transfer-encoding":
            transfer_encoding = value if transfer_encoding is None else f"{transfer_encoding}, {value}"
    version = status_line[:8]
    if transfer_encoding is not None:
        # Only chunked is relayed: another coding would reach the client undeclared once
        # this hop's framing headers are dropped. (An HTTP/1.0 answer may not use any.)
        if transfer_encoding.lower() != "chunked" or version != "HTTP/1.1":
            raise ProtocolError(f"Transfer-Encoding other than chunked (on HTTP/1.1): {transfer_encoding[:40]!r}")
    return Head(version, int(status_line[9:12]), status_line[13:], headers, frozenset(connection), length, transfer_encoding is not None)


def _content_length(value: str, before: int | None) -> int:
    """One Content-Length field (maybe a list, "5, 5"); every value must agree with ``before``."""
    length = before
    for item in value.split(",") if "," in value else (value,):
        item = item.strip(" \t")
        if not item or len(item) > _MAX_LENGTH_DIGITS or item.strip(_DIGITS):
            raise ProtocolError(f"bad Content-Length {value[:40]!r}")
        number = int(item)
        if length is not None and number != length:
            raise ProtocolError(f"Content-Length values disagree: {length} and {number}")
        length = number
    return length


def _what_is_wrong(head: bytes) -> str:
    """Why ``head`` fails the grammar, in one line (only called when it does)."""
    lines = head.split(b"\r\n")
    for number, line in enumerate(lines):
        if b"\n" in line or b"\r" in line:
            return "a line of the head ended by a bare LF or CR"
        if number == 0:
            if _STATUS.fullmatch(line) is None:
                return f"not an HTTP/1.x status line: {line[:80]!r}"
            continue
        if line[:1] in (b" ", b"\t"):
            return f"an obsolete line folding (obs-fold): {line[:40]!r}"
        name, colon, value = line.partition(b":")
        if not colon:
            return f"a header line without a colon: {line[:40]!r}"
        if _NAME.fullmatch(name) is None:
            return f"a header name that is not a token: {name[:40]!r}"
        if _FIELD.fullmatch(line) is None:
            return f"a control character in the value of {name[:40].decode('latin-1')}"
    return f"a malformed head: {head[:80]!r}"  # not reached: some line fails above


class ConnectionCache:
    """Idle keep-alive connections, one set per thread, at most ``limit`` in the process."""

    def __init__(self, limit: int, per_thread: int = 1):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._limit = limit
        self._kept = 0
        self._per_thread = per_thread

    @property
    def kept(self) -> int:
        """Connections counted against the limit: idle ones, and ones in use after being idle."""
        return self._kept

    def _idle(self) -> dict:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = {}
        return idle

    def take(self, origin: Origin) -> Connection | None:
        """An idle connection to ``origin`` that still looks alive, or None."""
        conn = self._idle().pop(origin, None)
        if conn is None:
            return None
        # A readable idle socket means the origin closed it or sent bytes past its last
        # answer: either way the next answer read from it would not be the next request's.
        # Checked at every reuse, however recent (one poll(2)): bytes that came 50 ms after
        # an answer would otherwise be relayed as the answer to another agent's request.
        # poll, not select: select() cannot watch a descriptor past 1,023.
        if conn.buffer or _readable(conn.sock):
            self.discard(conn)
            return None
        return conn

    def give_back(self, origin: Origin, conn: Connection) -> None:
        idle = self._idle()
        if origin in idle or len(idle) >= self._per_thread:
            old = idle.pop(origin, None) or idle.pop(next(iter(idle)))
            self.discard(old)
        if not conn.counted:
            with self._lock:
                if self._kept >= self._limit:
                    conn.close()
                    return
                self._kept += 1
            conn.counted = True
        idle[origin] = conn

    def discard(self, conn: Connection) -> None:
        if conn.counted:
            with self._lock:
                self._kept -= 1
            conn.counted = False
        conn.close()


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class Answer:
    """The origin's answer: status line, headers (repeats kept, hop-by-hop removed), body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]
    length: int | None  # bytes of body when it was read whole


class StreamedBody:
    """Yields the origin's body in chunks; gives the connection back if it was read to the end.

    If the body breaks off (bad framing, no byte within the idle timeout, the origin
    closing early), iterating raises ``BrokenBody``. Before the first piece the caller
    can still answer with an error of its own; after it, the head is gone to the client,
    and only cutting its connection tells it that the answer is not whole.
    """

    def __init__(self, conn: Connection, head: Head, framing: str, origin: Origin, cache: ConnectionCache):
        self._conn = conn
        if framing == LENGTH:
            self._pieces = conn.stream(head.length)
        elif framing == CHUNKED:
            self._pieces = conn.unchunk()
        else:
            self._pieces = conn.until_close()
        # Reusable once read to the end, unless the end was the origin closing.
        self._reusable = framing != UNTIL_CLOSE and head.keep_alive
        self._origin = origin
        self._cache = cache
        self._complete = False

    def __iter__(self) -> Iterator[bytes]:
        origin = self._origin
        try:
            yield from self._pieces
        except (OSError, ProtocolError) as exc:  # TIMED_OUT are OSErrors
            raise _body_failure(exc, origin, BrokenBody) from None
        self._complete = True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._reusable:
            self._cache.give_back(self._origin, conn)
        else:
            self._cache.discard(conn)


def end_to_end(head: Head, framing: str) -> list[tuple[str, str]]:
    """The answer's headers without hop-by-hop ones, any its Connection header names, and
    X-Agent-Proxy-Error: that header says an error is the proxy's own, so no origin may send it.

    Content-Length is relayed once, as the number parsed (duplicates agreed), and not at
    all for a chunked answer (RFC 9112 6.3: the chunked framing wins).
    """
    named = head.connection
    out = []
    length_sent = framing == CHUNKED
    for name, value in head.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower == "x-agent-proxy-error":
            continue
        if lower == "content-length":
            if length_sent:
                continue
            length_sent, value = True, str(head.length)
        out.append((name, value))
    return out


def request_head(method: str, target: str, headers: list[tuple[str, str]], length: int) -> bytes:
    """The request line and headers, ready to send.

    Every value was parsed by waitress (no CR or LF can be in it) or built by the proxy;
    waitress hands them over as latin-1 strings, so latin-1 sends the bytes it received.
    """
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1", "surrogateescape")


def _send(conn: Connection, head: bytes, body, length: int, payload: bytes | None) -> bool:
    """Send the request; False if the origin's final answer began before all of a large
    body was sent (the rest is then not sent, and the connection ends with that answer).

    An origin may refuse a request before reading its body (a 401 or a 413) and stop
    reading (RFC 9112 9.5 asks a client to watch for that); its answer is relayed,
    not a send that fails or times out.
    """
    if payload is not None or not length:
        conn.sock.sendall(head + payload if payload else head)
        return True
    conn.sock.sendall(head)
    remaining = length
    while remaining:
        if _answer_began(conn):
            return False
        chunk = body.read(min(CHUNK, remaining))
        if not chunk:
            raise OriginError("the client's body ended early")
        try:
            conn.sock.sendall(chunk)
        except (*TIMED_OUT, BrokenPipeError, ConnectionResetError):
            if _answer_began(conn):
                return False
            raise
        remaining -= len(chunk)
    return True


def _answer_began(conn: Connection) -> bool:
    """Whether the origin has begun its final answer (or closed the connection) while the
    body is sent; what it sent stays in the buffer for the head to be read from. A TLS
    record without data (a session ticket) and whole 1xx answers are not a beginning."""
    sock = conn.sock
    if not _readable(sock):
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(0)
            try:
                data = sock.recv(RECEIVE)
            finally:
                sock.settimeout(conn.timeout)
        else:
            data = sock.recv(RECEIVE, socket.MSG_DONTWAIT)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:  # a reset: reading the head says so
        return True
    if not data:
        return True
    buffer = conn.buffer
    buffer += data
    end = 0
    while match := _INTERIM_HEAD.match(buffer, end):
        end = match.end()
    rest = bytes(buffer[end:end + 10])
    # An interim answer still arriving is not a final one either.
    unfinished = rest in (b"HTTP/1.1 1"[:len(rest)], b"HTTP/1.0 1"[:len(rest)]) and b"\r\n\r\n" not in buffer[end:]
    return bool(rest) and not unfinished


def answer_head(conn: Connection) -> Head:
    """The final answer's head; interim 1xx answers (100 Continue, 103 Early Hints) are skipped."""
    for interim in range(MAX_INTERIM + 1):
        try:
            head = parse_head(conn.read_head())
        except (ClosedEarly, ConnectionResetError):
            if interim:  # bytes of an answer arrived: not a connection to try again
                raise ProtocolError("the origin closed the connection after an interim answer") from None
            raise
        if head.status == 101:
            raise ProtocolError("the origin switched protocols (101); upgrades are not relayed")
        if head.status >= 200:
            return head
    raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")


def _body_failure(exc: OSError | ProtocolError, origin: Origin, error: type[OriginError]) -> OriginError:
    """What a failure while reading an answer's body says, as ``error`` (OriginError
    while nothing was relayed yet, BrokenBody after the head was)."""
    if isinstance(exc, TIMED_OUT):
        return error(f"{origin.authority} sent no byte of the body for {origin.idle_timeout:g} s", "timeout")
    if isinstance(exc, ProtocolError):
        return error(f"{origin.authority} sent a bad answer: {exc}", "bad-answer")
    return error(f"reading from {origin.authority} failed: {exc.strerror or exc}", "bad-answer")


def forward(
    cache: ConnectionCache,
    origin: Origin,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body,
    length: int,
) -> Answer:
    """Send one request and return the answer; raise OriginError if the origin fails us.

    ``body`` is a file-like object with ``length`` bytes (0: none). Connect, send and
    the answer's head share one deadline, ``origin.head_timeout``.

    A request is sent a second time, on a fresh connection, only if it is safe and
    certain to be the same request (RFC 9110 9.2.2): an idempotent method, a first try on
    a reused keep-alive connection (which the origin may have closed as it was sent),
    not a byte of an answer received, and a body that was read whole (small bodies are
    read first; large ones stream straight through and cannot be sent again).
    """
    deadline = time.monotonic() + origin.head_timeout
    payload = body.read(length) if 0 < length <= BUFFER_LIMIT else None
    request = request_head(method, target, headers, length)
    may_resend = method in IDEMPOTENT and (payload is not None or not length)
    conn = cache.take(origin)
    while True:
        reused = conn is not None
        try:
            if conn is None:
                conn = origin.connect(deadline)
        except TIMED_OUT:
            raise OriginError(f"connecting to {origin.authority} timed out after {origin.connect_timeout:g} s", "timeout") from None
        except ssl.SSLError as exc:
            raise OriginError(f"TLS with {origin.authority} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise OriginError(f"cannot connect to {origin.authority}: {exc.strerror or exc}") from None
        try:
            conn.deadline = deadline
            whole = _send(conn, request, body, length, payload)
            head = answer_head(conn)
            conn.deadline = None
            if not whole:  # answered before the body was all sent: not a connection to reuse
                head.connection |= {"close"}
        except BaseException as exc:
            cache.discard(conn)
            if isinstance(exc, TIMED_OUT):
                raise OriginError(f"{origin.authority} did not answer within {origin.head_timeout:g} s", "timeout") from None
            if isinstance(exc, (ClosedEarly, ConnectionResetError, BrokenPipeError)):
                if reused and may_resend:
                    conn = None
                    reused = may_resend = False
                    continue  # the origin closed an idle keep-alive connection: once on a fresh one
                raise OriginError(f"{origin.authority} closed the connection before answering", "closed") from None
            if isinstance(exc, ProtocolError):
                raise OriginError(f"{origin.authority} sent a bad answer: {exc}", "bad-answer") from None
            if isinstance(exc, OSError):
                raise OriginError(f"talking to {origin.authority} failed: {exc.strerror or exc}") from None
            raise
        break

    framing = head.framing(method)
    answer_headers = end_to_end(head, framing)
    if framing == NO_BODY or framing == LENGTH and head.length <= BUFFER_LIMIT:
        try:
            data = conn.read_exactly(head.length) if framing == LENGTH else b""
        except BaseException as exc:
            cache.discard(conn)
            if isinstance(exc, (OSError, ProtocolError)):
                raise _body_failure(exc, origin, OriginError) from None
            raise
        if head.keep_alive:
            cache.give_back(origin, conn)
        else:
            cache.discard(conn)
        return Answer(head.status, head.reason, answer_headers, (data,), len(data))
    return Answer(head.status, head.reason, answer_headers, StreamedBody(conn, head, framing, origin, cache), None)
