"""What the kernel says about our server processes: CPU time, memory, children, descriptors
and connections."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Iterable

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces; fields start after it.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICK


def run_seconds(pids: Iterable[int]) -> float:
    """Time the processes' threads have run on a CPU, in seconds, to the nanosecond
    (/proc/PID/task/TID/schedstat): for costs too small for clock ticks. Threads that
    have ended are not counted, so measure across work that starts none."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                pass
    return total / 1e9


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the highest resident set size the process has had."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def rss_kib(pids: Iterable[int]) -> int:
    """VmRSS of the processes together."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids)


def descriptors(pids: Iterable[int]) -> int:
    """Open file descriptors of the processes together."""
    return sum(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in pids)


def connections_to(pids: Iterable[int], network: ipaddress.IPv4Network, port: int) -> int:
    """The processes' TCP (IPv4) sockets whose far end is ``port`` on an address in ``network``."""
    def far_end(local: tuple[ipaddress.IPv4Address, int], far: tuple[ipaddress.IPv4Address, int]) -> bool:
        return far[1] == port and far[0] in network
    return _sockets(pids, far_end)


def connections_on(pids: Iterable[int], ports: Iterable[int]) -> int:
    """The processes' TCP (IPv4) connections accepted on one of ``ports`` (their listening
    sockets left out): for a worker, the front's connections to it."""
    ports = set(ports)
    def accepted(local: tuple[ipaddress.IPv4Address, int], far: tuple[ipaddress.IPv4Address, int]) -> bool:
        return local[1] in ports and far[1] != 0
    return _sockets(pids, accepted)


def _endpoint(text: str) -> tuple[ipaddress.IPv4Address, int]:
    address, port = text.split(":")
    return ipaddress.IPv4Address(bytes.fromhex(address)[::-1]), int(port, 16)   # little-endian on x86


def _sockets(pids: Iterable[int], wanted) -> int:
    """The processes' descriptors that are TCP (IPv4) sockets ``wanted(local, far)`` picks."""
    count = 0
    for pid in pids:
        inodes = set()
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if wanted(_endpoint(fields[1]), _endpoint(fields[2])):
                inodes.add(fields[9])
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue   # closed while we looked
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    return count


def with_children(pid: int) -> list[int]:
    """``pid`` and its descendants (an nginx or HAProxy master and its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue  # gone while we looked
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found
