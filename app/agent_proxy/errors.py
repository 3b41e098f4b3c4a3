"""Errors the proxy itself makes: JSON ``{"title","description"}`` plus ``X-Agent-Proxy-Error``.

An upstream's or agent's own error status is relayed untouched and never passes through
here, so the header tells an operator at a glance whose error it is.
"""

from __future__ import annotations

import http
import json

import falcon

ERROR_HEADER = "X-Agent-Proxy-Error"


class ProxyError(Exception):
    """A request the proxy answers itself with ``status``; ``code`` goes in the header."""

    def __init__(self, status: int, code: str, title: str, description: str = "", headers: dict | None = None):
        super().__init__(description or title)
        self.status = status
        self.code = code
        self.title = title
        self.description = description
        self.headers = headers or {}


def bad_target(description: str) -> ProxyError:
    return ProxyError(400, "bad-target", "Bad target", description)


def unauthorized(description: str) -> ProxyError:
    return ProxyError(401, "bad-signature", "Signature required", description)


def forbidden(code: str, description: str) -> ProxyError:
    return ProxyError(403, code, "Forbidden", description)


def body(title: str, description: str) -> bytes:
    return json.dumps({"title": title, "description": description}).encode()


def handle_proxy_error(req: falcon.Request, resp: falcon.Response, ex: ProxyError, params) -> None:
    resp.status = ex.status
    resp.content_type = "application/json"
    resp.data = body(ex.title, ex.description)
    resp.set_header(ERROR_HEADER, ex.code)
    for name, value in ex.headers.items():
        resp.set_header(name, value)


# Falcon's own errors (unknown /_proxy/ path, method not allowed, bad request line) in the
# same shape; the code is the status name, e.g. "not-found".
def serialize_falcon_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
    status = http.HTTPStatus(ex.status_code)
    resp.content_type = "application/json"
    resp.data = body(status.phrase, ex.description or "")
    resp.set_header(ERROR_HEADER, status.phrase.lower().replace(" ", "-"))
