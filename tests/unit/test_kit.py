"""The test kit's promises: bounded stops that take the whole process group, waits that
fail fast with the process's output, records that never match a reused PID, and secret
files that are never readable by others."""

from __future__ import annotations

import signal
import socket
import sys
import time

import pytest

from kit import Process, ProcessError, free_ports, wait_for_port, wait_until, write_private

# Ignores SIGTERM, starts a child that does too, prints the child's PID, then sleeps.
STUBBORN = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); "
            "print(child.pid, flush=True); time.sleep(60)")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


def test_stop_kills_the_whole_group_after_the_timeout(tmp_path):
    proc = Process("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "stubborn.log").start()
    child = int(wait_until(lambda: proc.output().strip(), 10, "the child's PID"))
    started = time.monotonic()
    status = proc.stop(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert status == -signal.SIGKILL and proc.stopped == "killed after 0.5 s"
    wait_until(lambda: gone(child), 5, "the child killed with its group")


def test_stop_of_a_process_that_obeys_sigterm(tmp_path):
    proc = Process("sleeper", ["sleep", "60"], tmp_path / "sleeper.log").start()
    assert proc.stop() == -signal.SIGTERM and proc.stopped == "stopped"
    assert proc.stop() == -signal.SIGTERM and proc.stopped == "already gone"


def test_wait_for_port_fails_at_once_with_the_output_of_a_process_that_exited(tmp_path):
    proc = Process("failing", [sys.executable, "-c", "print('cannot bind: no such thing'); raise SystemExit(3)"],
                   tmp_path / "failing.log").start()
    started = time.monotonic()
    with pytest.raises(ProcessError, match=r"(?s)failing exited with 3 before listening.*cannot bind: no such thing"):
        wait_for_port("127.0.0.1", free_ports(1)[0], timeout=30, proc=proc)
    assert time.monotonic() - started < 10


def test_output_shows_this_start_only(tmp_path):
    log = tmp_path / "twice.log"
    for word in ("first", "second"):
        proc = Process("twice", ["echo", word], log).start()
        proc.wait(5)
    assert proc.output() == "second\n" and log.read_text() == "first\nsecond\n"


def test_a_record_does_not_match_a_process_that_took_its_pid(tmp_path):
    proc = Process("sleeper", ["sleep", "60"], tmp_path / "sleeper.log").start()
    try:
        record = proc.record()
        assert Process.from_record(record).alive()
        reused = Process.from_record({**record, "start_time": record["start_time"] - 1})
        assert not reused.alive()
        reused.stop(timeout=0.1)
        assert reused.stopped == "already gone" and proc.alive()
    finally:
        proc.stop()


def test_wait_until_returns_the_value_or_names_what_did_not_happen():
    values = iter([None, [], ["ready"]])
    assert wait_until(lambda: next(values), 5, "a value") == ["ready"]
    with pytest.raises(TimeoutError, match="the impossible: not within 0.2 s"):
        wait_until(lambda: False, 0.2, "the impossible")


def test_free_ports_are_consecutive_and_bindable():
    ports = free_ports(3)
    assert ports == list(range(ports[0], ports[0] + 3))
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", ports[0]))
        b.bind(("127.0.0.1", ports[2]))


def test_write_private_leaves_a_new_or_an_old_file_readable_by_its_owner_only(tmp_path):
    new, old = tmp_path / "new.key", tmp_path / "old.key"
    old.write_text("an earlier, longer secret\n")
    old.chmod(0o644)
    write_private(new, b"secret\n")
    write_private(old, "rotated\n")
    assert (new.read_bytes(), old.read_text()) == (b"secret\n", "rotated\n")
    assert [oct(path.stat().st_mode & 0o777) for path in (new, old)] == ["0o600", "0o600"]
