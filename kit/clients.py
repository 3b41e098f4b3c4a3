"""Clients for tests against a node front: a bounded load, a PROXY protocol header, /echo over TLS,
and a reader of chunked framing as a client received it."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from http.client import HTTPSConnection
from typing import Callable

import urllib3


@dataclass
class LoadResult:
    ok: dict[str, int]
    failed: dict[str, list[str]]
    seconds: float
    client_retries: int


def run_load(http: urllib3.PoolManager, url: str, total: int, threads: int, at: int, action: Callable[[], None], post_every: int = 0, limit: float = 20) -> LoadResult:
    """``total`` requests from ``threads`` threads, bounded by ``limit`` seconds; ``action`` runs once after ``at`` of them.

    Every ``post_every``-th request is a POST (0: none). A request fails when it raises or
    does not answer 200.
    """
    lock, counter = threading.Lock(), iter(range(total))
    ok = {"GET": 0, "POST": 0}
    failed: dict[str, list[str]] = {"GET": [], "POST": []}
    done, retried, fired = [0], [0], threading.Event()
    deadline = time.monotonic() + limit

    def one(index: int) -> None:
        method = "POST" if post_every and index % post_every == 0 else "GET"
        try:
            response = http.request(method, f"{url}/echo?i={index}", body=b"x" * 100 if method == "POST" else None)
            good = response.status == 200
            reason = f"status {response.status}: {response.data[:200]!r}"
            retries = len(response.retries.history) if response.retries else 0
        except Exception as exc:  # the test counts every kind of failure
            good, reason, retries = False, repr(exc), 0
        with lock:
            retried[0] += retries
            if good:
                ok[method] += 1
            else:
                failed[method].append(reason)
            done[0] += 1
            fire = done[0] >= at and not fired.is_set()
            if fire:
                fired.set()
        if fire:
            action()

    def loop() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            one(index)

    start = time.monotonic()
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(limit + 30)
    result = LoadResult(ok, failed, time.monotonic() - start, retried[0])
    assert sum(ok.values()) + sum(len(v) for v in failed.values()) == total, f"load did not finish within {limit} s: {result}"
    assert fired.is_set()
    return result


def proxy_v2_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A PROXY protocol v2 header (TCP over IPv4) claiming ``source`` as the client."""
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port, destination_port)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def echo_via(port: int, source: str, headers: dict | None = None, prefix: bytes = b"") -> dict:
    """GET /echo over TLS from ``source``, optionally after raw ``prefix`` bytes; the origin's record."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    raw.sendall(prefix)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.sock = context.wrap_socket(raw)
    connection.request("GET", "/echo", headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200, body
    return json.loads(body)


def headers_of(record: dict) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return found




def dechunk(raw: bytes) -> tuple[bytes, int, bytes]:
    """A chunked body as received (``curl --raw``, a raw socket): its data, how many
    chunks carried it, and what follows the last chunk's size line (trailers, blank line).
    Raises ValueError where the framing is not chunked."""
    data, chunks, at = bytearray(), 0, 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end].split(b";")[0], 16)
        if not size:
            return bytes(data), chunks, raw[end + 2:]
        data += raw[end + 2:end + 2 + size]
        chunks += 1
        at = end + 2 + size + 2
