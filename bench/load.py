"""The load generator: wrk with a Lua script that reports its own numbers as JSON.

wrk's ``done`` hook hands the script the exact latency histogram, so percentiles and
error counts are read from there rather than from wrk's rounded text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Workload:
    """One kind of request at one concurrency."""

    name: str           # e.g. get-200B-c32
    method: str
    path: str           # on the origin (or the agent), e.g. /small
    connections: int
    body_bytes: int = 0

    @property
    def threads(self) -> int:
        return min(2, self.connections)


def script(workload: Workload, directory: Path) -> Path:
    """The Lua file for ``workload``: method, body, and the JSON report."""
    lines = [f'wrk.method = "{workload.method}"']
    if workload.body_bytes:
        lines.append(f'wrk.body = string.rep("x", {workload.body_bytes})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    path = directory / f"{workload.name}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed: `make deps` installs it (tools/apt-packages), or apt-get install wrk")
    return found


def run(url: str, workload: Workload, lua: Path, seconds: float, headers: Sequence[str] = (),
        prefix: Sequence[str] = ()) -> dict:
    """Run wrk once against ``url``; returns the script's numbers plus requests/s."""
    argv = [*prefix, wrk_binary(), f"-t{workload.threads}", f"-c{workload.connections}",
            f"-d{seconds:g}s", "--timeout", "5s", "-s", str(lua)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk against {url} did not finish within {seconds + 30:g} s") from None
    line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk against {url} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    result = json.loads(line[len("BENCH "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6) if result["duration_us"] else 0.0
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return result
