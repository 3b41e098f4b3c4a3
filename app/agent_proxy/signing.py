"""The shared-secret signature that ties the proxy and the upstream together.

    sig = hex(HMAC-SHA256(secret, "v1\\n{ts}\\n{proxy_id}\\n{method}\\n{path_and_query}\\n{client_ip}"))

``path_and_query`` is the request target exactly as the receiver gets it (raw, not
decoded); ``client_ip`` is the agent's address on northbound calls and empty otherwise.
The scheme is stateless: any node holding the secret of a proxy_id signs and verifies.

Headers:
    upstream -> proxy   Authorization: AgentProxy-HMAC ts=<ts>, sig=<hex>
    proxy -> upstream   X-Agent-Proxy-Signature: v1 ts=<ts>, sig=<hex>
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

AUTH_SCHEME = "AgentProxy-HMAC"
HANDSHAKE_METHOD = "HANDSHAKE"

_PARAMS_RE = re.compile(r"^\s*ts=(\d{1,12}),\s*sig=([0-9a-f]{64})\s*$")


class SignatureError(Exception):
    """A signature is missing, malformed, stale or wrong; the message says which."""


def signature(
    secret: bytes, ts: int, proxy_id: str, method: str, path_and_query: str, client_ip: str = ""
) -> str:
    message = f"v1\n{ts}\n{proxy_id}\n{method}\n{path_and_query}\n{client_ip}"
    return hmac.new(secret, message.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def authorization(secret: bytes, proxy_id: str, method: str, path_and_query: str, ts: int | None = None) -> str:
    """The Authorization header value the upstream sends to a proxy."""
    ts = int(time.time()) if ts is None else ts
    return f"{AUTH_SCHEME} ts={ts}, sig={signature(secret, ts, proxy_id, method, path_and_query)}"


def signature_header(
    secret: bytes, proxy_id: str, method: str, path_and_query: str, client_ip: str = "", ts: int | None = None
) -> str:
    """The X-Agent-Proxy-Signature header value a proxy sends to the upstream."""
    ts = int(time.time()) if ts is None else ts
    return f"v1 ts={ts}, sig={signature(secret, ts, proxy_id, method, path_and_query, client_ip)}"


def _parse(value: str | None, prefix: str) -> tuple[int, str]:
    if not value:
        raise SignatureError("missing signature")
    if not value.startswith(prefix + " "):
        raise SignatureError(f"signature must start with {prefix!r}")
    match = _PARAMS_RE.match(value[len(prefix) + 1:])
    if not match:
        raise SignatureError("malformed signature (expected ts=<unix seconds>, sig=<64 hex>)")
    return int(match.group(1)), match.group(2)


def _verify(
    ts: int, sig: str, secret: bytes, proxy_id: str, method: str, path_and_query: str,
    client_ip: str, max_skew: int, now: float | None,
) -> None:
    now = time.time() if now is None else now
    if abs(now - ts) > max_skew:
        when = "old" if now > ts else "in the future"
        raise SignatureError(f"signature timestamp is {abs(int(now - ts))} s {when} (allowed: {max_skew} s either way)")
    expected = signature(secret, ts, proxy_id, method, path_and_query, client_ip)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("signature does not match")


def verify_authorization(
    value: str | None, secret: bytes, proxy_id: str, method: str, path_and_query: str,
    max_skew: int, now: float | None = None,
) -> None:
    """Check an upstream's Authorization header; raise SignatureError if it fails."""
    ts, sig = _parse(value, AUTH_SCHEME)
    _verify(ts, sig, secret, proxy_id, method, path_and_query, "", max_skew, now)


def verify_signature_header(
    value: str | None, secret: bytes, proxy_id: str, method: str, path_and_query: str,
    client_ip: str = "", max_skew: int = 300, now: float | None = None,
) -> None:
    """Check a proxy's X-Agent-Proxy-Signature header; raise SignatureError if it fails."""
    ts, sig = _parse(value, "v1")
    _verify(ts, sig, secret, proxy_id, method, path_and_query, client_ip, max_skew, now)
