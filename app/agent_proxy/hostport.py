"""``host:port`` as a URL or a log line writes it: an IPv6 address in brackets; the
address a local client reaches a listener at; and what a host name may look like."""

from __future__ import annotations

import re

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+", re.IGNORECASE)


def is_host_name(text: str) -> bool:
    """Is ``text`` a DNS host name: dot-separated labels of ASCII letters, digits and
    inner hyphens (RFC 1123), 253 characters at most?

    Not when its last label is a number: resolvers read ``127.1`` or ``0x7f000001`` as
    IPv4 addresses in odd forms, and ``1.2.3.4.5`` is a mistyped address, not a name.
    """
    return (len(text) <= 253 and _HOST_NAME.fullmatch(text) is not None
            and _NUMBER.fullmatch(text.rsplit(".", 1)[-1]) is None)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_host(bind: str) -> str:
    """Where a client on this host reaches a listener bound to ``bind``: a wildcard bind
    on loopback, any other address as it is."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
