"""Every error the proxy makes, in one catalogue, and the CLI's runtime failure.

An error the proxy answers itself is JSON ``{"title","description"}`` with
``X-Agent-Proxy-Error: <code>``; its status and title come from ``CATALOGUE`` and nowhere
else (the README's error table is this table, checked by a test). An upstream's or
agent's own error status is relayed untouched and never passes through here, so the
header tells an operator at a glance whose error it is.
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named in annotations: the CLI starts without Falcon
    import falcon

ERROR_HEADER = "X-Agent-Proxy-Error"


@dataclass(frozen=True)
class Error:
    code: str
    status: int
    title: str
    when: str  # one line for the README's table


CATALOGUE: dict[str, Error] = {e.code: e for e in (
    Error("bad-request", 400, "Bad request", "the request breaks HTTP/1.1 framing: Content-Length with Transfer-Encoding, a Transfer-Encoding other than `chunked`, control bytes in the target, an HTTP/1.1 request without exactly one Host of the form host[:port], an OPTIONS or TRACE whose `Max-Forwards` is not one number, a malformed head (the connection is closed)"),
    Error("bad-target", 400, "Bad target", "a southbound target that is not `/_proxy/agents/{ip}/{port}/{path}` with a canonical IP and port, or an absolute-form target"),
    Error("bad-forwarded-for", 400, "Bad request", "the trusted front sent an X-Forwarded-For that is not an address"),
    Error("bad-nonce", 400, "Bad handshake", "a handshake body that is not `{\"nonce\": N}` with 8-256 URL-safe characters (`A-Z a-z 0-9 - . _ ~`)"),
    Error("bad-signature", 401, "Signature required", "a signature that is missing, malformed, wrong or outside `limits.auth_skew_seconds`"),
    Error("source-not-allowed", 403, "Forbidden", "the caller's address may not call this path"),
    Error("target-forbidden", 403, "Forbidden", "a southbound target that is never allowed (loopback, link-local, multicast, ...)"),
    Error("target-not-allowed", 403, "Forbidden", "a southbound target outside `networks.agents` or `agents.ports`"),
    Error("not-found", 404, "Not found", "a path under `/_proxy/` that is not in the route table, or not served on this listener"),
    Error("method-not-allowed", 405, "Method not allowed", "a method the route does not take, CONNECT anywhere, and a TRACE whose `Max-Forwards` is 0 (with `Allow`)"),
    Error("body-too-large", 413, "Body too large", "a request body over `limits.max_body_bytes`"),
    Error("too-many-connections", 429, "Too many connections", "the nginx front: a request on a connection past `front.max_conn_per_source` from one client address (with `Retry-After: 1`; the HAProxy front closes such a connection instead)"),
    Error("header-too-large", 431, "Header too large", "a request head over waitress's limit (262,144 bytes)"),
    Error("internal-error", 500, "Internal error", "a fault in the proxy itself (logged with a traceback; the native front: HAProxy's own 500, `termination_state` `I...` in its access line)"),
    Error("bad-answer", 502, "Bad gateway", "the origin's answer breaks HTTP/1.1 and nothing was relayed yet"),
    Error("worker-failed", 502, "Bad gateway", "no whole answer from the node front's worker: it closed the connection or broke HTTP/1.1, or its head was over the HAProxy front's 16 KiB buffer (the nginx front: or no worker could be reached)"),
    Error("upstream-unreachable", 502, "Bad gateway", "no connection to the upstream (refused, TLS failed, ...)"),
    Error("agent-unreachable", 502, "Bad gateway", "no connection to the agent"),
    Error("upstream-closed", 502, "Bad gateway", "the upstream closed the connection before answering"),
    Error("agent-closed", 502, "Bad gateway", "the agent closed the connection before answering"),
    Error("feature-failed", 503, "Feature failed", "the feature this request needs failed at start or reload (an unreadable CA file, no agent port, ...); `/_proxy/ready` says why"),
    Error("overloaded", 503, "Overloaded", "`limits.max_in_flight` requests are being served or queued (with `Retry-After: 1`)"),
    Error("no-worker", 503, "Unavailable", "the node front (HAProxy) found no worker to take the request within its `timeout queue` (10 s): every worker down, draining or full (with `Retry-After: 1`)"),
    Error("upstream-timeout", 504, "Gateway timeout", "the upstream did not connect or answer in time"),
    Error("agent-timeout", 504, "Gateway timeout", "the agent did not connect or answer in time"),
    Error("worker-timeout", 504, "Gateway timeout", "a worker did not answer within the node front's server timeout (the upstream's connect and read timeouts + 15 s)"),
)}


def printable(text: str, limit: int = 200) -> str:
    """``text`` (a peer's words, say) fit for one line of a message: control characters
    and backslashes escaped, cut short past ``limit`` characters."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


class ProxyError(Exception):
    """A request the proxy answers itself: the catalogue's status and title for ``code``."""

    def __init__(self, code: str, description: str = "", headers: dict | None = None):
        error = CATALOGUE[code]  # a KeyError here is a code missing from the catalogue
        super().__init__(description or error.title)
        self.code = code
        self.status = error.status
        self.title = error.title
        self.description = description
        self.headers = headers or {}


class CommandError(Exception):
    """A runtime failure of a CLI command, with a message for the operator (exit 1)."""


def body(code: str, description: str) -> bytes:
    return json.dumps({"title": CATALOGUE[code].title, "description": description}).encode()


def wsgi_answer(error: ProxyError) -> tuple[str, list[tuple[str, str]], bytes]:
    """``error`` as a WSGI status line, headers and body, for the layer below Falcon."""
    data = body(error.code, error.description)
    headers = [("Content-Type", "application/json"), (ERROR_HEADER, error.code), ("Content-Length", str(len(data)))]
    return f"{error.status} {http.HTTPStatus(error.status).phrase}", headers + list(error.headers.items()), data


def handle_proxy_error(req: falcon.Request, resp: falcon.Response, ex: ProxyError, params) -> None:
    resp.status = ex.status
    resp.content_type = "application/json"
    resp.data = body(ex.code, ex.description)
    resp.set_header(ERROR_HEADER, ex.code)
    for name, value in ex.headers.items():
        resp.set_header(name, value)


# The errors Falcon or waitress raise by themselves (method not allowed, a malformed
# request, a head or body too large, a fault).
_SERVER_CODES = {
    400: "bad-request", 404: "not-found", 405: "method-not-allowed", 413: "body-too-large", 431: "header-too-large",
}


def code_for_status(status: int) -> str:
    """The catalogue's code for an error a server layer (Falcon, waitress) raised."""
    return _SERVER_CODES.get(status) or ("bad-request" if status < 500 else "internal-error")


def serialize_falcon_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
    code = code_for_status(ex.status_code)
    resp.content_type = "application/json"
    resp.data = body(code, ex.description or "")
    resp.set_header(ERROR_HEADER, code)
