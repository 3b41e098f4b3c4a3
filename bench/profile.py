"""Where one worker spends its CPU while relaying small requests: py-spy, top functions.

The single-worker path (origin + one `agent-proxy serve`) is loaded with wrk at 32
connections; py-spy samples the worker meanwhile, keeping only the samples of the thread
that holds the GIL: the Python work that serialises one worker (threads waiting on a
socket drop the GIL and are left out, and so is time in system calls made without it; the
CPU line printed above the table counts everything). A function's own time is the share of
those samples in which it was the innermost frame; its total time counts every sample it
appears in.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from . import load, procstat
from .paths import Lab
from .run import log

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


def parse_collapsed(text: str) -> tuple[collections.Counter, collections.Counter, int]:
    """py-spy's raw (collapsed) stacks -> (own samples, total samples, all samples) per function."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_key(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    return own, total, samples


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(__file__).resolve().parents[1] / ".venv" / "bin")) or shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -e 'app[bench]'")
    return found


def profile(work_dir: Path, results_dir: Path, seconds: float, top: int) -> int:
    spy = py_spy()
    with Lab(work_dir, big_bytes=0) as lab:
        lab.origin()
        path = lab.single_worker()
        pid = path.worker_pids[0]
        workload = load.Workload("get-200B-c32", "GET", "/small", 32)
        lua = load.script(workload, work_dir)
        log(f"profiling worker {pid} for {seconds:g} s under wrk -c32 GET /small")
        out = work_dir / "profile.txt"
        wrk = subprocess.Popen(
            [load.wrk_binary(), "-t2", "-c32", f"-d{seconds + 3:g}s", "-s", str(lua), path.url("/small")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            time.sleep(1)  # past the first connections
            cpu_before, started = procstat.cpu_seconds([pid]), time.monotonic()
            spied = subprocess.run(
                [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                 "--format", "raw", "--gil", "--nonblocking", "--output", str(out)],
                capture_output=True, text=True, timeout=seconds + 30,
            )
            cpu = procstat.cpu_seconds([pid]) - cpu_before
            wall = time.monotonic() - started
            stdout, stderr = wrk.communicate(timeout=seconds + 30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait(5)
        if spied.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed (exit {spied.returncode}): {spied.stderr.strip()}")
        own, total, samples = parse_collapsed(out.read_text())
        if not samples:
            raise RuntimeError("py-spy recorded no samples")
        results_dir.mkdir(parents=True, exist_ok=True)
        kept = results_dir / "profile-collapsed.txt"
        shutil.copyfile(out, kept)
    line = next((l for l in stdout.splitlines() if l.startswith("BENCH ")), None)
    summary = json.loads(line[6:]) if line else {}
    rps = summary.get("requests", 0) / (summary.get("duration_us", 1) / 1e6)
    print()
    print(f"worker CPU while sampled: {cpu / wall * 100:.0f}% of one core; wrk: {rps:,.0f} req/s "
          f"(py-spy attached) -> ~{cpu / wall / rps * 1e6 if rps else 0:,.0f} µs CPU per request")
    print(f"{samples} samples holding the GIL; top {top} functions by own time:")
    print(f"{'own %':>7} {'total %':>8}  function (file)")
    for name, count in own.most_common(top):
        print(f"{count / samples * 100:7.1f} {total[name] / samples * 100:8.1f}  {name}")
    print(f"\nall stacks (collapsed, for flamegraph tools): {kept}")
    return 0
