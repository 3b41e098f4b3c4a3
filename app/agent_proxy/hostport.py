"""``host:port`` as a URL or a log line writes it: an IPv6 address in brackets; and the
address a local client reaches a listener at."""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_host(bind: str) -> str:
    """Where a client on this host reaches a listener bound to ``bind``: a wildcard bind
    on loopback, any other address as it is."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
