"""`agent-proxy lb`: take one server out of a balancer and put it back, through HAProxy's stats socket.

A rolling upgrade does, per node and on every balancer:
``drain`` (no new connections; the ones open go on), ``wait-idle`` (until the server
carries no connection), the upgrade, then ``ready`` (back in rotation; waits until the
health checks say UP). ``status`` prints where a server stands.

HAProxy's runtime API is used as documented: ``set server B/S state drain|ready`` and
``show stat`` (CSV; ``status`` and ``scur`` per server). The socket needs ``level admin``
(the lb-haproxy and node-haproxy templates set it).
"""

from __future__ import annotations

import csv
import io
import socket
import time
from dataclasses import dataclass

DEFAULT_SOCKET = "/run/haproxy/agent-proxy.sock"
DEFAULT_BACKEND = "nodes"
POLL_SECONDS = 0.2


class LbError(Exception):
    """The socket cannot be used, or the server does not reach the wanted state (exit 1)."""


class UnknownServer(LbError):
    """The backend or server named does not exist on this balancer (a usage error: exit 2)."""


@dataclass(frozen=True)
class ServerState:
    backend: str
    server: str
    status: str        # UP, DOWN, DRAIN, MAINT, NOLB, "UP 1/2" (going down), ...
    sessions: int      # scur: connections the server carries now
    check: str         # check_status: L7OK, L4CON, ...

    def line(self) -> str:
        return f"{self.backend}/{self.server}: {self.status}, {self.sessions} connection(s), check {self.check or '-'}"


class StatsSocket:
    def __init__(self, path: str, timeout: float = 5):
        self.path, self.timeout = path, timeout

    def command(self, text: str) -> str:
        """One command, one answer (the socket closes after it in non-interactive mode)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(text.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise LbError(f"cannot use the HAProxy stats socket {self.path}: {exc.strerror or exc}") from None
        return b"".join(chunks).decode(errors="replace")

    def state(self, backend: str, server: str) -> ServerState:
        answer = self.command("show stat")
        if not answer.startswith("# pxname,"):
            raise LbError(f"{self.path}: unexpected answer to `show stat`: {answer.strip()[:200]!r}")
        rows = csv.DictReader(io.StringIO(answer[2:]))
        backends = set()
        for row in rows:
            backends.add(row["pxname"])
            if row["pxname"] == backend and row["svname"] == server:
                return ServerState(backend, server, row["status"], int(row["scur"] or 0), row.get("check_status", ""))
        if backend not in backends:
            raise UnknownServer(f"{self.path}: no backend {backend!r} (backends: {', '.join(sorted(backends))})")
        raise UnknownServer(f"{self.path}: backend {backend!r} has no server {server!r}")

    def set_state(self, backend: str, server: str, state: str) -> ServerState:
        self.state(backend, server)  # names checked first, for a clear error
        answer = self.command(f"set server {backend}/{server} state {state}").strip()
        if answer:
            raise LbError(f"{self.path}: set server {backend}/{server} state {state}: {answer}")
        return self.state(backend, server)


def drain(sock: StatsSocket, backend: str, server: str) -> ServerState:
    return sock.set_state(backend, server, "drain")


def ready(sock: StatsSocket, backend: str, server: str, timeout: float) -> ServerState:
    """Back in rotation; waits until the health checks have it UP."""
    sock.set_state(backend, server, "ready")
    return _wait(sock, backend, server, timeout, lambda s: s.status == "UP", "UP")


def wait_idle(sock: StatsSocket, backend: str, server: str, timeout: float) -> ServerState:
    return _wait(sock, backend, server, timeout, lambda s: s.sessions == 0, "idle (no connection)")


def _wait(sock: StatsSocket, backend: str, server: str, timeout: float, done, what: str) -> ServerState:
    deadline = time.monotonic() + timeout
    while True:
        state = sock.state(backend, server)
        if done(state):
            return state
        if time.monotonic() >= deadline:
            raise LbError(f"{backend}/{server} not {what} within {timeout:g} s; now {state.status} "
                          f"with {state.sessions} connection(s)")
        time.sleep(POLL_SECONDS)
