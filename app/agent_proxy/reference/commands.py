"""End-to-end command signatures between the control plane and one agent.

The token is the one the agent chose in its handshake; the proxy relays the command and
never holds the token, so it can neither forge nor alter a command:

    sig = hex(HMAC-SHA256(token, "cmd-v1\\n{ts}\\n{instance_id}\\n{sha256 hex of the body}"))
    X-Agent-Command-Signature: cmd-v1 ts=<ts>, sig=<hex>
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

HEADER = "X-Agent-Command-Signature"
_VALUE_RE = re.compile(r"^cmd-v1 ts=(\d{1,12}), sig=([0-9a-f]{64})$")


class CommandSignatureError(Exception):
    """Missing, malformed, stale or wrong; the message says which."""


def _sig(token: str, ts: int, instance_id: str, body: bytes) -> str:
    message = f"cmd-v1\n{ts}\n{instance_id}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def sign(token: str, instance_id: str, body: bytes, ts: int | None = None) -> str:
    ts = int(time.time()) if ts is None else ts
    return f"cmd-v1 ts={ts}, sig={_sig(token, ts, instance_id, body)}"


def verify(value: str | None, token: str, instance_id: str, body: bytes, max_skew: int, now: float | None = None) -> str:
    """Check a header value; return the signature (for replay detection) or raise."""
    if not value:
        raise CommandSignatureError(f"missing {HEADER}")
    match = _VALUE_RE.match(value.strip())
    if not match:
        raise CommandSignatureError("malformed signature (expected cmd-v1 ts=<unix seconds>, sig=<64 hex>)")
    ts, sig = int(match.group(1)), match.group(2)
    now = time.time() if now is None else now
    if abs(now - ts) > max_skew:
        raise CommandSignatureError(f"signature timestamp is {int(now - ts)} s off (allowed: {max_skew} s)")
    if not hmac.compare_digest(_sig(token, ts, instance_id, body), sig):
        raise CommandSignatureError("signature does not match")
    return sig
