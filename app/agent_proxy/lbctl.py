"""`agent-proxy lb`: take one server out of a balancer and put it back, through HAProxy's stats socket.

A rolling upgrade does, per node and on every balancer:
``drain`` (no new connections; the ones open go on), ``wait-idle`` (until the server
carries no connection), the upgrade, then ``ready`` (back in rotation; waits until the
health checks say UP). ``status`` prints where a server stands.

Each action applies to the server in every backend named, or, when none is named, in
every backend that has a server of that name: on a balancer with control traffic apart
a node is server ``node1`` of both ``nodes`` and ``control_nodes`` (lb-haproxy), and a
node drained from one only would still take the other's connections. On a node front a
worker is server ``worker<port>`` of both ``workers`` and ``control_workers``
(node-haproxy), for the same reason.

HAProxy's runtime API is used as documented: ``set server B/S state drain|ready`` and
``show stat`` (CSV; ``status`` and ``scur`` per server). The socket needs ``level admin``
(the lb-haproxy and node-haproxy templates set it). On a node it is the config's
``front.stats_socket``; a balancer's config stays on the controller (the haproxy_lb role),
so there the socket is named with ``--socket``.
"""

from __future__ import annotations

import csv
import errno
import io
import socket
import time
from dataclasses import dataclass

POLL_SECONDS = 0.2
# The failures of connect() that mean the front is not up, with that hint.
NOT_RUNNING = {errno.ENOENT: "no such socket", errno.ECONNREFUSED: "nothing listens on it"}


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
    def __init__(self, path: str, source: str, timeout: float = 5):
        """``source``: where the path came from (``--socket``, or the config key and file),
        named when the socket cannot be used."""
        self.path, self.source, self.timeout = path, source, timeout

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
            reason = f"{NOT_RUNNING[exc.errno]} (is agent-proxy-front running?)" if exc.errno in NOT_RUNNING else exc.strerror or exc
            raise LbError(f"{self.source}: {self.path}: {reason}") from None
        return b"".join(chunks).decode(errors="replace")

    def _rows(self) -> list[dict]:
        answer = self.command("show stat")
        if not answer.startswith("# pxname,"):
            raise LbError(f"{self.path}: unexpected answer to `show stat`: {answer.strip()[:200]!r}")
        return list(csv.DictReader(io.StringIO(answer[2:])))

    def backends_with(self, server: str) -> list[str]:
        """Every backend that has a server named ``server``, in the config's order."""
        found = [row["pxname"] for row in self._rows() if row["svname"] == server]
        if not found:
            raise UnknownServer(f"{self.path}: no backend has a server {server!r}")
        return found

    def states(self, backends: list[str], server: str) -> list[ServerState]:
        """The server in each backend, from one `show stat`."""
        rows = {(row["pxname"], row["svname"]): row for row in self._rows()}
        known = {backend for backend, _ in rows}
        found = []
        for backend in backends:
            row = rows.get((backend, server))
            if row is None:
                if backend not in known:
                    raise UnknownServer(f"{self.path}: no backend {backend!r} (backends: {', '.join(sorted(known))})")
                raise UnknownServer(f"{self.path}: backend {backend!r} has no server {server!r}")
            found.append(ServerState(backend, server, row["status"], int(row["scur"] or 0), row.get("check_status", "")))
        return found

    def set_state(self, backends: list[str], server: str, state: str) -> list[ServerState]:
        self.states(backends, server)  # names checked first, for a clear error
        for backend in backends:
            answer = self.command(f"set server {backend}/{server} state {state}").strip()
            if answer:
                raise LbError(f"{self.path}: set server {backend}/{server} state {state}: {answer}")
        return self.states(backends, server)


def drain(sock: StatsSocket, backends: list[str], server: str) -> list[ServerState]:
    return sock.set_state(backends, server, "drain")


def ready(sock: StatsSocket, backends: list[str], server: str, timeout: float) -> list[ServerState]:
    """Back in rotation; waits until the health checks have it UP in every backend."""
    sock.set_state(backends, server, "ready")
    return _wait(sock, backends, server, timeout, lambda s: s.status == "UP", "UP")


def wait_idle(sock: StatsSocket, backends: list[str], server: str, timeout: float) -> list[ServerState]:
    return _wait(sock, backends, server, timeout, lambda s: s.sessions == 0, "idle (no connection)")


def _wait(sock: StatsSocket, backends: list[str], server: str, timeout: float, done, what: str) -> list[ServerState]:
    deadline = time.monotonic() + timeout
    while True:
        states = sock.states(backends, server)
        waiting = [state for state in states if not done(state)]
        if not waiting:
            return states
        if time.monotonic() >= deadline:
            state = waiting[0]
            raise LbError(f"{state.backend}/{server} not {what} within {timeout:g} s; now {state.status} "
                          f"with {state.sessions} connection(s)")
        time.sleep(POLL_SECONDS)
