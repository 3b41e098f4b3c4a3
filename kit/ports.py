"""Free loopback ports, asked of the kernel (bind to port 0), never guessed."""

from __future__ import annotations

import contextlib
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` consecutive free ports (workers listen on listen.port, +1, ...)."""
    for _ in range(50):
        first = free_port(host)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    held.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
        return list(range(first, first + count))
    raise RuntimeError(f"found no {count} consecutive free ports on {host}")
