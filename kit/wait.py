"""Bounded waits: every one ends, and its failure says what did not happen."""

from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

from . import netns as namespaces
from .process import Process, ProcessError

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something true and return that, or raise
    TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def connects(host: str, port: int, netns: str | None = None, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds (from inside ``netns`` if given)."""

    def attempt() -> bool:
        try:
            socket.create_connection((host, port), timeout).close()
            return True
        except OSError:
            return False

    return namespaces.call_in(netns, attempt, timeout=timeout + 5) if netns else attempt()


def wait_for_port(host: str, port: int, timeout: float = 15, netns: str | None = None,
                  proc: Process | None = None) -> None:
    """Until something accepts TCP connections on host:port, in ``netns`` (default: the
    namespace ``proc`` runs in). Fails at once, with its output, if ``proc`` exits first."""
    netns = netns or (proc.netns if proc is not None else None)
    where = f"{host}:{port}{' in ' + netns if netns else ''}"

    def listening() -> bool:
        if proc is not None and not proc.alive():
            raise ProcessError(f"{proc.name} exited with {proc.returncode} before listening on {where}:\n{proc.output(30)}")
        return connects(host, port, netns)

    try:
        wait_until(listening, timeout, f"nothing listened on {where}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}:\n{proc.output(30)}" if proc is not None else str(exc)) from None
