"""Network namespaces for the lab and the tests: created and removed by name, never more.

Nothing here touches the root namespace except creating and deleting the named
namespaces themselves: links are created inside a namespace and moved to its peer.
"""

from __future__ import annotations

import subprocess
from typing import Sequence


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
