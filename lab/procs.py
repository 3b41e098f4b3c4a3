"""The lab's processes: started inside a namespace, recorded, stopped by PID.

A record keeps the PID and the process's start time (from /proc), so a later `down`
run stops exactly the processes the lab started and never one that took a reused PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from . import netns


@dataclass
class Proc:
    name: str           # e.g. node1/worker-8002
    namespace: str
    argv: list[str]
    pid: int
    start_time: int     # /proc/PID/stat field 22, in clock ticks since boot
    log: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Proc":
        return cls(**data)


_children: dict[int, subprocess.Popen] = {}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a PID, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def alive(proc: Proc) -> bool:
    child = _children.get(proc.pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start_time and stat[0] not in ("Z", "X")


def start(name: str, namespace: str, argv: Sequence[str], log_path: Path, env: dict | None = None) -> Proc:
    """Start ``argv`` inside ``namespace`` (`ip netns exec` execs it: same PID), output to a file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            netns.prefix(namespace) + list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
    _children[popen.pid] = popen
    stat = _stat(popen.pid)
    if stat is None:
        popen.wait(5)
        raise RuntimeError(f"{name} exited at once with {popen.returncode}; see {log_path}")
    return Proc(name, namespace, list(argv), popen.pid, stat[1], str(log_path))


def exit_status(proc: Proc) -> int | None:
    child = _children.get(proc.pid)
    return child.poll() if child is not None else None


def stop(proc: Proc, timeout: float = 10) -> str:
    """SIGTERM, then SIGKILL after ``timeout``; returns what happened, for the report."""
    if not alive(proc):
        _reap(proc)
        return "already gone"
    _signal(proc, signal.SIGTERM)
    if _wait_gone(proc, timeout):
        return "stopped"
    _signal(proc, signal.SIGKILL)
    if _wait_gone(proc, 5):
        return f"killed after {timeout:g} s"
    return "STILL RUNNING after SIGKILL"


def _signal(proc: Proc, signum: int) -> None:
    if alive(proc):
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass


def _wait_gone(proc: Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            _reap(proc)
            return True
        time.sleep(0.05)
    return False


def _reap(proc: Proc) -> None:
    child = _children.pop(proc.pid, None)
    if child is not None:
        try:
            child.wait(1)
        except subprocess.TimeoutExpired:
            pass
