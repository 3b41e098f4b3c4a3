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
streaming them), large ones stream in 256 KiB reads. Nothing is decoded, nothing is
decompressed, redirects are relayed as they are.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

CHUNK = 256 * 1024
# One receive while reading a head or a small body. Larger receives cost more than they
# save: a 256 KiB buffer is an mmap and a munmap per receive (measured: ~30 us a request).
RECEIVE = 64 * 1024
MAX_HEAD = 64 * 1024  # status line and headers of one answer
MAX_HEADERS = 100
# Idle connections older than this are checked for a close by the origin before reuse.
IDLE_CHECK_AFTER = 1.0
# Answers up to this size are read whole; larger ones are streamed.
BUFFER_LIMIT = 256 * 1024

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


class OriginError(Exception):
    """The origin could not be reached or did not answer in time (``timeout``)."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class ProtocolError(Exception):
    """The origin's answer is not HTTP/1.x that can be relayed; the message says why."""


class ClosedEarly(Exception):
    """The origin closed the connection before sending a byte of its answer."""


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host, port, TLS and timeouts."""

    scheme: str
    host: str
    port: int
    connect_timeout: float
    read_timeout: float
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def connect(self) -> Connection:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
                sock.settimeout(self.read_timeout)
            else:
                # The kernel keeps the read timeout (SO_RCVTIMEO, SO_SNDTIMEO) of a blocking
                # socket: a Python socket timeout polls before every send and receive, two
                # more system calls and GIL round trips per request. A call that runs out of
                # time fails with EAGAIN. (Not under TLS: the ssl module retries EAGAIN on a
                # blocking socket for ever.)
                sock.settimeout(None)
                seconds = int(self.read_timeout)
                timeval = struct.pack("ll", seconds, int((self.read_timeout - seconds) * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except BaseException:
            sock.close()
            raise
        return Connection(sock)


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

    __slots__ = ("sock", "buffer", "used", "counted")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.used = 0.0       # monotonic time it was last given back to the cache
        self.counted = False  # counted against the cache's limit

    def fill(self) -> int:
        """Receive what the origin has sent (at least a byte); 0 when it has closed."""
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
        return self.sock.recv(size)

    def stream(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes, in pieces of at most CHUNK."""
        while size:
            data = self.take(min(CHUNK, size))
            if not data:
                raise ProtocolError("the origin closed the connection mid-body")
            size -= len(data)
            yield data

    def unchunk(self) -> Iterator[bytes]:
        """A chunked body's data, up to and including its last chunk and trailers (not relayed)."""
        while True:
            size_field = self.read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_field[:20]!r}") from None
            if size == 0:
                while self.read_line():
                    pass
                return
            yield from self.stream(size)
            if self.read_line():
                raise ProtocolError("a chunk longer than its size")

    def until_close(self) -> Iterator[bytes]:
        while data := self.take(CHUNK):
            yield data

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise ProtocolError("the origin closed the connection mid-body")
        return self.take(size)

    def read_line(self) -> bytes:
        """One line (without its end), for chunk sizes and trailers."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise ProtocolError("a chunk-size line over 64 KiB")
            if not self.fill():
                raise ProtocolError("the origin closed the connection mid-body")
        line = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[:end + 1]
        return line

    def read_head(self) -> bytes:
        """The status line and headers of the next answer, without the blank line."""
        buffer = self.buffer
        while True:
            end, size = buffer.find(b"\r\n\r\n"), 4
            bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))  # lines ended by LF alone
            if bare >= 0:
                end, size = bare, 2
            if end >= 0:
                break
            if len(buffer) > MAX_HEAD:
                raise ProtocolError("an answer head over 64 KiB")
            if not self.fill():
                if buffer:
                    raise ProtocolError("the origin closed the connection mid-head")
                raise ClosedEarly()
        head = bytes(buffer[:end])
        del buffer[:end + size]
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
    length: int | None                 # Content-Length, if given
    transfer_encoding: str | None      # lowercase

    @property
    def keep_alive(self) -> bool:
        if "close" in self.connection:
            return False
        return self.version == "HTTP/1.1" or "keep-alive" in self.connection

    def framing(self, method: str) -> str:
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            return NO_BODY
        if self.transfer_encoding is not None:
            # chunked must be the last coding; any other transfer coding ends at close
            return CHUNKED if self.transfer_encoding.rsplit(",", 1)[-1].strip() == "chunked" else UNTIL_CLOSE
        return LENGTH if self.length is not None else UNTIL_CLOSE


def parse_head(head: bytes) -> Head:
    """Parse a status line and headers; raise ProtocolError for what cannot be relayed."""
    lines = head.decode("latin-1").split("\n")
    version, _, rest = lines[0].rstrip("\r").partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} headers")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    connection: set[str] = set()
    lengths: set[str] = set()
    transfer_encoding = None
    for name, value in headers:
        lower = name.lower()
        if lower == "connection":
            connection.update(t.strip().lower() for t in value.split(","))
        elif lower == "content-length":
            lengths.update(v.strip() for v in value.split(","))
        elif lower == "transfer-encoding":
            transfer_encoding = value.lower() if transfer_encoding is None else f"{transfer_encoding}, {value.lower()}"
    length = None
    if lengths and transfer_encoding is None:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise ProtocolError(f"bad Content-Length: {', '.join(sorted(lengths))}")
        length = int(lengths.pop())
    status = int(code)
    return Head(version, status, reason.strip(), headers, frozenset(connection), length, transfer_encoding)


class ConnectionCache:
    """Idle keep-alive connections, one set per thread, at most ``limit`` in the process."""

    def __init__(self, limit: int, per_thread: int = 1):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._limit = limit
        self._kept = 0
        self._per_thread = per_thread

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
        # A readable idle socket means the origin closed it (or sent garbage): drop it.
        # Origins keep idle connections for seconds, so a recently used one is not checked.
        if conn.buffer or (
            time.monotonic() - conn.used > IDLE_CHECK_AFTER and select.select([conn.sock], [], [], 0)[0]
        ):
            self.discard(conn)
            return None
        return conn

    def give_back(self, origin: Origin, conn: Connection) -> None:
        idle = self._idle()
        if origin in idle or len(idle) >= self._per_thread:
            old = idle.pop(origin, None) or idle.pop(next(iter(idle)))
            self.discard(old)
        conn.used = time.monotonic()
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


@dataclass
class Answer:
    """The origin's answer: status line, headers (repeats kept, hop-by-hop removed), body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]
    length: int | None  # bytes of body when it was read whole


class StreamedBody:
    """Yields the origin's body in chunks; gives the connection back if it was read to the end."""

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
        try:
            yield from self._pieces
        except (OSError, ProtocolError):
            # The origin broke off mid-body; the client sees a truncated answer, as it would directly.
            return
        self._complete = True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._reusable:
            self._cache.give_back(self._origin, conn)
        else:
            self._cache.discard(conn)


def end_to_end(head: Head) -> list[tuple[str, str]]:
    """The answer's headers without hop-by-hop ones and any its Connection header names."""
    named = head.connection
    return [(n, v) for n, v in head.headers if (lower := n.lower()) not in HOP_BY_HOP and lower not in named]


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


def _send(conn: Connection, head: bytes, body, length: int, payload: bytes | None) -> None:
    if payload is not None or not length:
        conn.sock.sendall(head + payload if payload else head)
        return
    conn.sock.sendall(head)
    remaining = length
    while remaining:
        chunk = body.read(min(CHUNK, remaining))
        if not chunk:
            raise OriginError("the client's body ended early")
        conn.sock.sendall(chunk)
        remaining -= len(chunk)


def _answer_head(conn: Connection) -> Head:
    """The final answer's head; interim 1xx answers (100 Continue, 103 Early Hints) are skipped."""
    while True:
        head = parse_head(conn.read_head())
        if head.status == 101:
            raise ProtocolError("the origin switched protocols; upgrades are not relayed")
        if not 100 <= head.status < 200:
            return head


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

    ``body`` is a file-like object with ``length`` bytes (0: none). Small bodies are read
    first so that a request on a keep-alive connection the origin has just closed can be
    sent again on a fresh one; large bodies stream straight through.
    """
    payload = body.read(length) if 0 < length <= BUFFER_LIMIT else None
    request = request_head(method, target, headers, length)
    for attempt in (1, 2):
        conn = cache.take(origin)
        reused = conn is not None
        try:
            if conn is None:
                conn = origin.connect()
        except socket.timeout:
            raise OriginError(f"connecting to {origin.authority} timed out after {origin.connect_timeout:g} s", timeout=True) from None
        except ssl.SSLError as exc:
            raise OriginError(f"TLS with {origin.authority} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise OriginError(f"cannot connect to {origin.authority}: {exc.strerror or exc}") from None
        try:
            _send(conn, request, body, length, payload)
            head = _answer_head(conn)
        except TIMED_OUT:
            cache.discard(conn)
            raise OriginError(f"{origin.authority} did not answer within {origin.read_timeout:g} s", timeout=True) from None
        except (ClosedEarly, ConnectionResetError, BrokenPipeError) as exc:
            cache.discard(conn)
            if reused and attempt == 1 and (payload is not None or not length):
                continue  # the origin closed an idle keep-alive connection: try a fresh one
            raise OriginError(f"{origin.authority} closed the connection: {str(exc) or 'before answering'}") from None
        except (OSError, ProtocolError) as exc:
            cache.discard(conn)
            raise OriginError(f"talking to {origin.authority} failed: {exc}") from None
        except OriginError:
            cache.discard(conn)
            raise
        break

    answer_headers = end_to_end(head)
    framing = head.framing(method)
    if framing == NO_BODY or framing == LENGTH and head.length <= BUFFER_LIMIT:
        try:
            data = conn.read_exactly(head.length) if framing == LENGTH else b""
        except TIMED_OUT:
            cache.discard(conn)
            raise OriginError(f"{origin.authority} stopped sending within {origin.read_timeout:g} s", timeout=True) from None
        except (OSError, ProtocolError) as exc:
            cache.discard(conn)
            raise OriginError(f"reading from {origin.authority} failed: {exc}") from None
        if head.keep_alive:
            cache.give_back(origin, conn)
        else:
            cache.discard(conn)
        return Answer(head.status, head.reason, answer_headers, (data,), len(data))
    return Answer(head.status, head.reason, answer_headers, StreamedBody(conn, head, framing, origin, cache), None)
