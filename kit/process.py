"""A real process started by a test, the lab or the benchmark, and stopped by its PID.

The process gets a session (and so a process group) of its own, its output goes to a
log file, and it may run inside a network namespace (`ip netns exec` execs the command:
same PID). A record (``record()``, ``Process.from_record()``) keeps the PID together
with the start time from /proc, so a later run (`python -m lab down`) stops exactly
the process that was started and never one that took a reused PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import netns as namespaces


class ProcessError(RuntimeError):
    """A process did not start, or would not stop; the message names it."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a PID, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


@dataclass
class Process:
    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict | None = None
    netns: str | None = None
    pid: int = 0
    start_time: int = 0
    # How the last stop() ended: "stopped", "already gone", "killed after N s".
    stopped: str = ""
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    _log_offset: int = field(default=0, repr=False, compare=False)

    def start(self) -> "Process":
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = (namespaces.prefix(self.netns) if self.netns else []) + list(self.argv)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()   # output() shows this run only
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})}, start_new_session=True,
            )
        self.pid = self.popen.pid
        stat = _stat(self.pid)
        if stat is None:
            self.popen.wait(5)
            raise ProcessError(f"{self.name} exited at once with {self.popen.returncode}:\n{self.output()}")
        self.start_time = stat[1]
        return self

    # -- a record, for a later run to find the process again

    def record(self) -> dict:
        return {"name": self.name, "argv": list(self.argv), "log": str(self.log_path), "netns": self.netns,
                "pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_record(cls, data: dict) -> "Process":
        return cls(data["name"], data["argv"], Path(data["log"]), netns=data["netns"],
                   pid=data["pid"], start_time=data["start_time"])

    # -- looking

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[0] not in ("Z", "X")

    @property
    def returncode(self) -> int | None:
        """The exit status once it ended (None while it runs, or when another run started it)."""
        return self.popen.poll() if self.popen is not None else None

    def output(self, lines: int | None = None) -> str:
        """What it printed since this start (the last ``lines`` lines if given), for failure messages."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:]) if lines else text

    # -- stopping

    def signal(self, signum: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int | None:
        """Until it ended (raises ProcessError after ``timeout``); its exit status if it is our child."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} (pid {self.pid}) still running after {timeout:g} s")
            time.sleep(0.02)
        return self._reap()

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM; after ``timeout`` SIGKILL to its whole process group. Returns the exit status
        (None when another run started it); ``stopped`` says how it went."""
        if not self.alive():
            self.stopped = "already gone"
            return self._reap()
        self.signal(signal.SIGTERM)
        try:
            status = self.wait(timeout)
            self.stopped = "stopped"
            return status
        except ProcessError:
            pass
        if self.alive():   # checked again: the group is ours only while its leader is
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = self.wait(5)
        self.stopped = f"killed after {timeout:g} s"
        return status

    def _reap(self) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(1)
        except subprocess.TimeoutExpired:
            return None
