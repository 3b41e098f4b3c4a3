"""Network namespaces for the lab, the tests and the benchmark: created and removed by name, never more.

Nothing here touches the root namespace except creating and deleting the named
namespaces themselves: links are created inside a namespace and moved to its peer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import subprocess
import threading
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout)


def exists(name: str) -> bool:
    return name in names()


def names() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add(name: str) -> None:
    """Create a namespace with loopback up and IP forwarding off."""
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete(name: str) -> None:
    """Remove a namespace; processes still inside it must have been stopped first."""
    if exists(name):
        run(["ip", "netns", "delete", name])


def prefix(name: str) -> list[str]:
    """The argv prefix that runs a command inside ``name``."""
    return ["ip", "netns", "exec", name]


def ns_run(name: str, argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return run(prefix(name) + list(argv), check=check, timeout=timeout)


def link(ns_a: str, if_a: str, addr_a: str | None, ns_b: str, if_b: str, addr_b: str | None) -> None:
    """A veth pair between two namespaces; addresses in CIDR form (e.g. 10.0.0.1/24)."""
    run(["ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])
    for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
        if addr:
            run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])


def route(ns: str, destination: str, via: str) -> None:
    run(["ip", "-n", ns, "route", "add", destination, "via", via])


def forwarding(ns: str, enabled: bool = True) -> None:
    ns_run(ns, ["sysctl", "-qw", f"net.ipv4.ip_forward={1 if enabled else 0}"])


def bridge(ns: str, name: str) -> None:
    """A bridge (a switch with no address) inside ``ns``."""
    run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
    run(["ip", "-n", ns, "link", "set", name, "up"])


def attach(switch_ns: str, bridge_name: str, port: str, ns: str, ifname: str, addr: str | None) -> None:
    """Plug ``ns`` into a bridge: a veth pair whose switch end (``port``) joins the bridge."""
    link(switch_ns, port, None, ns, ifname, addr)
    run(["ip", "-n", switch_ns, "link", "set", port, "master", bridge_name])


def pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split()]


_CLONE_NEWNET = 0x40000000


def call_in(name: str, fn: Callable[..., T], *args, timeout: float = 60, **kwargs) -> T:
    """Call ``fn`` in a fresh thread that has joined namespace ``name``; return its result.

    Sockets that ``fn`` opens live in that namespace. Only that thread moves (setns acts
    on the calling thread) and it ends with the call, so nothing else is affected.
    """
    outcome: dict = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in namespace {name} did not finish within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
