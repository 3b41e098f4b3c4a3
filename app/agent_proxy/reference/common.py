"""What both reference peers share: event logs, an HTTPS WSGI server, one HTTP call.

The server is the standard library's ``wsgiref`` with a thread per connection and the
socket wrapped by ``ssl`` (waitress speaks no TLS). The TLS handshake runs in the
connection's own thread, so a slow client never blocks the accept loop.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

_print_lock = threading.Lock()


def log_event(peer: str, event: str, **fields) -> None:
    """One JSON line on stdout."""
    line = json.dumps({"ts": round(time.time(), 3), "peer": peer, "event": event, **fields}, default=str)
    with _print_lock:
        print(line, flush=True)


def host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); raise ValueError with a clear message."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port) if default_port else ""
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


# -- the server


class _Handler(WSGIRequestHandler):
    def get_environ(self):
        env = super().get_environ()
        # wsgiref decodes PATH_INFO; signatures cover the target exactly as it was sent.
        env["RAW_URI"] = self.path
        return env

    def log_message(self, format, *args):  # the apps log their own events
        pass


class _ThreadingTLSServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of new connections (workers
    # restarted under load open their pools at once) overflowed it, and dropped SYNs
    # became 3-second connect timeouts.
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None

    def server_bind(self):
        if ":" in self.server_address[0]:
            self.socket.close()
            self.socket = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Not super(): HTTPServer.server_bind does a reverse DNS lookup (socket.getfqdn),
        # which stalls for the resolver's time-out in a lab namespace with no DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def finish_request(self, request, client_address):
        request.settimeout(30)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        try:
            super().finish_request(request, client_address)
        finally:
            request.close()


MAX_BODY = 1024 * 1024


def _read_body_first(app):
    """Read the whole request body before the app runs.

    wsgiref closes the socket after the answer; unread body bytes would turn that close
    into a reset that can destroy the answer before the client reads it (e.g. a 401 sent
    without looking at the body).
    """

    def wrapped(env, start_response):
        try:
            length = int(env.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            start_response("413 Payload Too Large", [("Content-Type", "application/json")])
            return [b'{"title": "Body too large", "description": "at most 1 MiB"}']
        env["wsgi.input"] = io.BytesIO(env["wsgi.input"].read(length) if length > 0 else b"")
        return app(env, start_response)

    return wrapped


def make_server(app, host: str, port: int, ssl_context: ssl.SSLContext | None) -> _ThreadingTLSServer:
    """A listening server (the port accepts connections when this returns); call serve_forever()."""
    server = _ThreadingTLSServer((host, port), _Handler, bind_and_activate=True)
    server.ssl_context = ssl_context
    server.set_app(_read_body_first(app))
    return server


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- one HTTP call


class CallError(Exception):
    """The peer could not be reached or did not answer; the message says why."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict  # lower-case names; last value wins
    body: bytes
    certificate: bytes | None = None  # the peer's TLS certificate (DER), for https

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def call(
    url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None,
    context: ssl.SSLContext | None = None, timeout: float = 10,
) -> Answer:
    """One request to ``url``'s host with ``path`` as the request target, on a fresh connection."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context or client_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/json", **(headers or {})})
        certificate = conn.sock.getpeercert(binary_form=True) if parts.scheme == "https" else None
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data, certificate)
    except ssl.SSLCertVerificationError as exc:
        raise CallError(f"TLS with {url} failed: certificate verify failed: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise CallError(f"TLS with {url} failed: {exc.reason or exc}") from None
    except socket.timeout:
        raise CallError(f"{url} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CallError(f"cannot reach {url}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        conn.close()


def url_path(url: str) -> str:
    """The path prefix of a base URL, without a trailing slash ('' for none)."""
    return urlsplit(url).path.rstrip("/")


def fail(message: str) -> NoReturn:
    """A usage error at start-up: one line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
