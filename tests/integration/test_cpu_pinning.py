"""Each worker runs on one core (limits.pin_cpu): worker N on the Nth it may use.

Real `agent-proxy serve` processes; the cores of every thread are read from the kernel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kit import AGENT_PROXY, Process, free_ports, start_worker, wait_for_port, write_config

ALLOWED = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning needs two cores to choose from")


def thread_cores(pid: int) -> dict[int, set[int]]:
    """Every thread of ``pid`` and the cores it may run on."""
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def listening(proc: Process) -> dict:
    return next(json.loads(line) for line in proc.output().splitlines() if '"message": "listening"' in line)


def workers(tmp_path: Path, count: int, **limits) -> list[Process]:
    ports = free_ports(count)
    config = write_config(tmp_path, "http://127.0.0.1:9", listen={"host": "127.0.0.1", "port": ports[0]}, limits=limits)
    return [start_worker(config, tmp_path, port, name=f"worker-{port}") for port in ports]


def test_workers_run_each_on_its_own_core(tmp_path):
    started = workers(tmp_path, 2)
    try:
        for index, proc in enumerate(started):
            cores = thread_cores(proc.pid)
            assert len(cores) > 16, "waitress's threads are running"
            assert set(map(frozenset, cores.values())) == {frozenset({ALLOWED[index]})}, cores
            assert listening(proc)["cpu"] == ALLOWED[index]
    finally:
        for proc in started:
            proc.stop()


def test_with_pin_cpu_false_the_threads_may_run_anywhere(tmp_path):
    [proc] = workers(tmp_path, 1, pin_cpu=False)
    try:
        assert all(cores == set(ALLOWED) for cores in thread_cores(proc.pid).values())
        assert listening(proc)["cpu"] is None
    finally:
        proc.stop()


def test_a_worker_confined_to_one_core_stays_there(tmp_path):
    """systemd's CPUAffinity= (here taskset) narrows what a worker picks from."""
    last = ALLOWED[-1]
    ports = free_ports(1)
    config = write_config(tmp_path, "http://127.0.0.1:9", listen={"host": "127.0.0.1", "port": ports[0]})
    proc = Process("confined", ["taskset", "-c", str(last), AGENT_PROXY, "serve", "-c", str(config)], tmp_path / "confined.log").start()
    try:
        wait_for_port("127.0.0.1", ports[0], proc=proc)
        assert all(cores == {last} for cores in thread_cores(proc.pid).values())
        assert listening(proc)["cpu"] is None
    finally:
        proc.stop()
