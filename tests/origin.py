"""Small real HTTP origins for tests: records what they receive and answer on cue.

``ScriptedOrigin`` answers exactly the bytes a test scripts (hostile answers, closes,
drips), on raw sockets. ``Origin`` is a well-behaved one:

Run in-process (``Origin().start()``) or as a program (``python -m tests.origin PORT
[--tls CERT KEY]``, e.g. as an agent inside a namespace). Paths:

    /echo...            JSON of method, raw target, headers (all, repeats kept), body sha256 and size
    /slow?s=N           waits N seconds, then answers
    /big?n=BYTES        streams BYTES bytes (chunked)
    /redirect           302 to /elsewhere (must come back as it is)
    /gzip               a gzip-encoded body with Content-Encoding: gzip
    /cookies            two Set-Cookie headers
    /status/NNN         answers NNN with a body of its own

A leading /base is ignored, so that an upstream URL with a path prefix can be tested.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "origin"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        digest, remaining, size = hashlib.sha256(), length, 0
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            remaining -= len(chunk)
        self._digest = digest.hexdigest()
        return b""

    def handle_any(self) -> None:
        self._body()
        url = urlsplit(self.path.removeprefix("/base"))
        query = parse_qs(url.query)
        record = {
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_sha256": self._digest,
            "body_size": int(self.headers.get("Content-Length") or 0),
            "client": self.client_address[0],
            "client_port": self.client_address[1],
        }
        self.server.received.append(record)
        if url.path.startswith("/slow"):
            time.sleep(float(query.get("s", ["1"])[0]))
            self._send(200, b"slow answer")
        elif url.path.startswith("/big"):
            total = int(query.get("n", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"x" * (1 << 20)
            while total > 0:
                part = block[: min(total, len(block))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                total -= len(part)
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/redirect":
            self._send(302, b"moved", [("Location", "/elsewhere")])
        elif url.path == "/gzip":
            self._send(200, gzip.compress(b"compressed payload " * 50), [("Content-Encoding", "gzip"), ("Content-Type", "text/plain")])
        elif url.path == "/cookies":
            self._send(200, b"cookies", [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")])
        elif url.path.startswith("/status/"):
            code = int(url.path.rsplit("/", 1)[1])
            # An origin that claims its error is the proxy's: it must not get through.
            forged = [("X-Agent-Proxy-Error", "bad-answer")] if "forge" in url.query else []
            self._send(code, b'{"origin": "own error"}', [("Content-Type", "application/json"), *forged])
        else:
            self._send(200, json.dumps(record).encode(), [("Content-Type", "application/json")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = handle_any


class Origin:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None, client_ca: str | None = None):
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.received = []
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            if client_ca:  # demand a client certificate signed by (or equal to) client_ca
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(client_ca)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"

    @property
    def received(self) -> list[dict]:
        return self.server.received

    def arrivals(self, prefix: str, since: int = 0) -> int:
        """How many requests whose target starts with ``prefix`` came after the first
        ``since`` (a ``len(received)`` taken earlier: a module's origin keeps every test's)."""
        return sum(record["target"].startswith(prefix) for record in self.received[since:])

    def start(self) -> "Origin":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CLOSE = object()  # in a script: close the connection instead of answering


class Closing(bytes):
    """In a script: send these bytes, then close the connection."""


class Drip(list):
    """In a script: send these pieces ``interval`` seconds apart, then close (or when the client hangs up)."""

    def __init__(self, pieces, interval: float):
        super().__init__(pieces)
        self.interval = interval


class Early(bytes):
    """In a script: sent as soon as the request's head has arrived, before its body is read;
    then the connection is held ``hold`` seconds without reading, and closed."""

    def __new__(cls, answer: bytes, hold: float = 0):
        early = super().__new__(cls, answer)
        early.hold = hold
        return early


class ScriptedOrigin:
    """Answers the n-th request (over all connections) with ``script[n]``, byte for byte.

    A script item is bytes (sent; the connection stays open), ``Closing`` (sent, then the
    connection closed), ``CLOSE`` (closed without an answer), a ``Drip`` or ``Early``. Requests past
    the end of the script are recorded and never answered.
    """

    def __init__(self, script: list, host: str = "127.0.0.1"):
        self.script = list(script)
        self.requests: list[bytes] = []   # each request as received: head and body
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._accepting = threading.Thread(target=self._serve, daemon=True)
        self._accepting.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            thread = threading.Thread(target=self._answer_all, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer_all(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
                length = next((int(v) for n, v in fields if n.lower() == b"content-length"), 0)
                with self._lock:
                    early = self.script.pop(0) if self.script and isinstance(self.script[0], Early) else None
                    if early is not None:
                        self.requests.append(head + b"\r\n\r\n" + data[:length])   # what came with the head
                if early is not None:
                    conn.sendall(early)
                    time.sleep(early.hold)
                    return
                while len(data) < length:
                    data += conn.recv(65536)
                with self._lock:
                    self.requests.append(head + b"\r\n\r\n" + data[:length])
                    answer = self.script.pop(0) if self.script else None
                data = data[length:]
                if answer is None:
                    continue  # the script is done: hold the connection until the client closes it
                if answer is CLOSE:
                    return
                if isinstance(answer, Drip):
                    for piece in answer:
                        conn.sendall(piece)
                        time.sleep(answer.interval)
                    return
                conn.sendall(answer)
                if isinstance(answer, Closing):
                    return

    def close(self) -> None:
        with self._lock:
            sockets = [self._listener, *self._open]
        for sock in sockets:  # wakes the threads from accept() and recv()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in [self._accepting, *self._threads]:
            thread.join(10)


if __name__ == "__main__":
    args = sys.argv[1:]
    tls = (args[2], args[3]) if len(args) >= 4 and args[1] == "--tls" else None
    host, _, port = args[0].rpartition(":")
    origin = Origin(host or "0.0.0.0", int(port), tls)
    print(f"origin listening on {origin.url}", flush=True)
    origin.server.serve_forever()
