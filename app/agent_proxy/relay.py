"""Forwarding one request to an origin (the upstream or an agent) and relaying the answer.

Measured on the target machines, the standard library's ``http.client`` with one
persistent connection per worker thread costs about half of what a shared urllib3 pool
does per request, so that is the client: a waitress thread handles one request from start
to end, so a thread-local connection is never shared. Its ``email``-based header parser
and per-header validation were then the largest costs left in the relay (profiled: ~80 of
~150 us per request), so responses are read by ``FastResponse`` below; framing (length,
chunked, close) and body reading stay the standard library's. Bodies pass through as bytes: small
answers are read whole (cheaper than streaming them), large ones stream in 256 KiB reads.
Nothing is decoded, nothing is decompressed, redirects are relayed as they are.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

CHUNK = 256 * 1024
MAX_HEADERS = 100
MAX_HEADER_LINE = 65536
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


class Headers:
    """Response headers as the origin sent them: order and repeats kept.

    Stands in for the ``email``-based ``HTTPMessage`` that ``http.client`` builds, which
    was the largest single cost of a relayed request after the sockets themselves.
    """

    __slots__ = ("_items", "_first")

    def __init__(self, items: list[tuple[str, str]]):
        self._items = items
        self._first = {}
        for name, value in reversed(items):
            self._first[name.lower()] = value

    def get(self, name: str, default=None):
        return self._first.get(name.lower(), default)

    def get_all(self, name: str, default=None):
        lower = name.lower()
        found = [v for n, v in self._items if n.lower() == lower]
        return found or default

    def items(self) -> list[tuple[str, str]]:
        return self._items


class FastResponse(http.client.HTTPResponse):
    """``HTTPResponse`` with a plain header parser; framing and body reading are the stdlib's."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:  # skip interim 1xx answers (100 Continue, 103 Early Hints)
            version, status, reason = self._read_status()
            if not 100 <= status < 200 or status == 101:
                break
            self._read_header_lines()
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = Headers(self._read_header_lines())
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length) if int(length) >= 0 else None
            except ValueError:
                self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def _read_header_lines(self) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        while True:
            line = self.fp.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            if line in (b"\r\n", b"\n", b""):
                return items
            if len(items) >= MAX_HEADERS:
                raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
            text = line.decode("iso-8859-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and items:  # obsolete line folding
                name, value = items[-1]
                items[-1] = (name, f"{value} {text.strip()}")
                continue
            name, sep, value = text.partition(":")
            if sep:
                items.append((name.strip(), value.strip()))


class _Fast:
    """Connections whose responses use ``FastResponse``.

    ``putheader`` skips the stdlib's per-header validation: every header we send was
    either parsed by waitress (no CR or LF can be in it) or built by us.
    """

    response_class = FastResponse

    def putheader(self, header: str, *values: str) -> None:
        self._buffer.append(f"{header}: {', '.join(values)}".encode("latin-1", "surrogateescape"))


class HTTPConnection(_Fast, http.client.HTTPConnection):
    pass


class HTTPSConnection(_Fast, http.client.HTTPSConnection):
    pass


class OriginError(Exception):
    """The origin could not be reached or did not answer in time (``timeout``)."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


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

    def connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            conn = HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self.ssl_context,
                blocksize=CHUNK,
            )
        else:
            conn = HTTPConnection(self.host, self.port, timeout=self.connect_timeout, blocksize=CHUNK)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(self.read_timeout)
        return conn


def client_context(ca_file: str | None, verify: bool = True, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


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

    def take(self, origin: Origin) -> tuple[http.client.HTTPConnection | None, bool]:
        """An idle connection to ``origin`` that still looks alive, or None."""
        conn = self._idle().pop(origin, None)
        if conn is None:
            return None, False
        sock = conn.sock
        # A readable idle socket means the origin closed it (or sent garbage): drop it.
        # Origins keep idle connections for seconds, so a recently used one is not checked.
        if sock is None or (
            time.monotonic() - conn._agent_proxy_used > IDLE_CHECK_AFTER and select.select([sock], [], [], 0)[0]
        ):
            self._discard(conn)
            return None, False
        return conn, True

    def give_back(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        idle = self._idle()
        if origin in idle or len(idle) >= self._per_thread:
            old = idle.pop(origin, None) or idle.pop(next(iter(idle)))
            self._discard(old)
        conn._agent_proxy_used = time.monotonic()
        if not getattr(conn, "_agent_proxy_counted", False):
            with self._lock:
                if self._kept >= self._limit:
                    conn.close()
                    return
                self._kept += 1
            conn._agent_proxy_counted = True
        idle[origin] = conn

    def _discard(self, conn: http.client.HTTPConnection) -> None:
        if getattr(conn, "_agent_proxy_counted", False):
            with self._lock:
                self._kept -= 1
            conn._agent_proxy_counted = False
        conn.close()

    def discard(self, conn: http.client.HTTPConnection) -> None:
        self._discard(conn)


@dataclass
class Answer:
    """The origin's answer: status line, headers (repeats kept, hop-by-hop removed), body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]
    length: int | None  # bytes of body when it was read whole


class StreamedBody:
    """Yields the origin's body in chunks; returns the connection to the cache if it was read to the end."""

    def __init__(self, response: http.client.HTTPResponse, conn, origin: Origin, cache: ConnectionCache):
        self._response = response
        self._conn = conn
        self._origin = origin
        self._cache = cache

    def __iter__(self) -> Iterator[bytes]:
        read = self._response.read1
        try:
            while True:
                chunk = read(CHUNK)
                if not chunk:
                    return
                yield chunk
        except (OSError, http.client.HTTPException):
            # The origin broke off mid-body; the client sees a truncated answer, as it would directly.
            self._response.close()

    def close(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        if response.isclosed() and not response.will_close:
            self._cache.give_back(self._origin, self._conn)
        else:
            self._cache.discard(self._conn)


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and any the Connection header names."""
    named = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


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
    for attempt in (1, 2):
        conn, reused = cache.take(origin)
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
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if length or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(length))
            conn.endheaders(payload)
            if length and payload is None:
                remaining = length
                while remaining:
                    chunk = body.read(min(CHUNK, remaining))
                    if not chunk:
                        raise OriginError("the client's body ended early")
                    conn.send(chunk)
                    remaining -= len(chunk)
            response = conn.getresponse()
        except socket.timeout:
            cache.discard(conn)
            raise OriginError(f"{origin.authority} did not answer within {origin.read_timeout:g} s", timeout=True) from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            cache.discard(conn)
            if reused and attempt == 1 and (payload is not None or not length):
                continue  # the origin closed an idle keep-alive connection: try a fresh one
            raise OriginError(f"{origin.authority} closed the connection: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            cache.discard(conn)
            raise OriginError(f"talking to {origin.authority} failed: {exc}") from None
        break

    answer_headers = end_to_end(response.getheaders())
    if response.length is not None and response.length <= BUFFER_LIMIT or method == "HEAD":
        try:
            data = response.read()
        except socket.timeout:
            cache.discard(conn)
            raise OriginError(f"{origin.authority} stopped sending within {origin.read_timeout:g} s", timeout=True) from None
        except (OSError, http.client.HTTPException) as exc:
            cache.discard(conn)
            raise OriginError(f"reading from {origin.authority} failed: {exc}") from None
        if response.will_close:
            cache.discard(conn)
        else:
            cache.give_back(origin, conn)
        return Answer(response.status, response.reason, answer_headers, (data,), len(data))
    return Answer(response.status, response.reason, answer_headers, StreamedBody(response, conn, origin, cache), None)
