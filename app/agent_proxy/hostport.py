"""``host:port`` as a URL or a log line writes it: an IPv6 address in brackets."""

from __future__ import annotations


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
