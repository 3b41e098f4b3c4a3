"""One benchmark run: start the paths, measure them in alternation, collect medians."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from kit import dechunk

from . import load, procstat, report
from .load import Workload
from .paths import BenchPath, Lab

# The first one also warms every path up (connections, TLS sessions, lazy imports).
WORKLOADS = [
    Workload("get-200B-c32", "GET", "/small", 32),
    Workload("get-200B-c1", "GET", "/small", 1),
    Workload("get-200B-c4", "GET", "/small", 4),
    Workload("get-200B-c8", "GET", "/small", 8),
    Workload("get-64KiB-c32", "GET", "/medium", 32),
    Workload("post-1KiB-c32", "POST", "/upload", 32, body_bytes=1024),
]
SMOKE_WORKLOADS = [w for w in WORKLOADS if w.name == "get-200B-c32"]
PATH_KEYS = ["direct", "haproxy", "worker", "node", "node-native", "southbound", "worker-unpinned"]
# The node paths, each with its headline (the two front.mode values side by side).
NODE_KEYS = ["node", "node-native"]
EXPECTED_SIZE = {"/small": 200, "/medium": 64 * 1024, "/upload": 9}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    from importlib.metadata import version

    import agent_proxy

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "python": platform.python_version(),
        "agent_proxy": agent_proxy.__version__,
        "waitress": version("waitress"),
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line([load.wrk_binary(), "-v"]),
    }


def build_paths(lab: Lab, keys: list[str]) -> list[BenchPath]:
    starters = {"direct": lambda: direct, "haproxy": lab.haproxy_alone, "worker": lab.single_worker,
                "node": lab.full_node, "node-native": lab.native_node, "southbound": lab.southbound,
                "worker-unpinned": lab.unpinned_worker}
    direct = lab.origin()  # every other path relays to it
    paths = []
    for key in keys:
        log(f"starting path {key}")
        paths.append(starters[key]())
    return paths


def check(paths: list[BenchPath], workloads: list[Workload]) -> None:
    """Each path answers each workload with 200 and the right body before anything is timed."""
    for path in paths:
        for w in {(w.method, w.path, w.body_bytes) for w in workloads}:
            status, size = path.probe(*w)
            if status != 200 or size != EXPECTED_SIZE[w[1]]:
                raise RuntimeError(f"path {path.key}: {w[0]} {path.url(w[1])} answered {status} with {size} bytes "
                                   f"(expected 200 with {EXPECTED_SIZE[w[1]]})")


def measure(path: BenchPath, workload: Workload, lua: Path, seconds: float) -> dict:
    own_before = procstat.cpu_seconds(path.relay_pids)
    origin_before = procstat.cpu_seconds(path.origin_pids)
    result = load.run(path.url(workload.path), workload, lua, seconds,
                      path.headers(workload.method, workload.path), path.prefix)
    own = procstat.cpu_seconds(path.relay_pids) - own_before
    origin = procstat.cpu_seconds(path.origin_pids) - origin_before
    requests = max(1, result["requests"])
    result["cpu_us_per_request"] = own / requests * 1e6
    result["origin_cpu_us_per_request"] = None if path.relay_pids == path.origin_pids else origin / requests * 1e6
    return result


def big_bodies(lab: Lab) -> list[dict]:
    """Download and upload of lab.big_bytes through a fresh worker each; its RSS growth."""
    upload = lab.dir / "upload.bin"
    with open(upload, "wb") as handle:
        handle.truncate(lab.big_bytes)
    limit = {"max_body_bytes": max(lab.big_bytes * 2, 10 * 2**20)}
    out = []
    for name, extra in (("download", []), ("upload", ["-T", str(upload), "-X", "POST", "-H", "Expect:"])):
        path = lab.single_worker(f"big-{name}", limits=limit)
        pid = path.worker_pids[0]
        path.probe("GET", "/small")  # first request: lazy imports and the first connection
        before = procstat.rss_mib(pid)
        target = "/big" if name == "download" else "/upload"
        started = time.monotonic()
        done = subprocess.run(
            ["curl", "-s", "--max-time", "120", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{size_upload}",
             *extra, path.url(target)], capture_output=True, text=True, timeout=150)
        seconds = time.monotonic() - started
        status, down, up = done.stdout.split() if done.stdout.strip() else ("0", "0", "0")
        moved = int(float(down if name == "download" else up))
        if int(status) != 200 or moved != lab.big_bytes:
            raise RuntimeError(f"{name} of {lab.big_bytes} bytes through a worker: status {status}, {moved} bytes moved")
        peak = procstat.peak_rss_mib(pid)
        out.append({"name": f"{name} {lab.big_bytes / 2**20:.0f} MiB", "status": int(status), "bytes": moved,
                    "seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak,
                    "rss_growth_mib": peak - before})
        log(f"{name}: {moved / 2**20:.0f} MiB in {seconds:.2f} s, worker RSS {before:.1f} -> peak {peak:.1f} MiB")
    return out


def tiny_chunks(lab: Lab, chunks: int, downloads: int = 3) -> list[dict]:
    """An answer of ``chunks`` one-byte chunks through one worker and through HAProxy alone:
    each relay's CPU for ``downloads`` such answers, and how many chunks the client got."""
    origin = lab.chunky_origin(chunks)
    relays = {"one worker": lab.single_worker("tiny-worker", origin_port=origin),
              "HAProxy alone": lab.haproxy_alone("tiny-haproxy", origin_port=origin)}
    out = []
    for name, path in relays.items():
        cpu_before, started, sent = procstat.run_seconds(path.relay_pids), time.monotonic(), []
        for _ in range(downloads):
            done = subprocess.run(["curl", "-s", "--raw", "--max-time", "60", path.url("/tiny")],
                                  capture_output=True, timeout=90)
            try:
                data, pieces, _ = dechunk(done.stdout)
            except ValueError:  # not chunked as it should be: said below
                data, pieces = b"", 0
            if done.returncode or data != b"x" * chunks:
                raise RuntimeError(f"{chunks} one-byte chunks through {name}: curl exit {done.returncode}, "
                                   f"{len(data)} bytes received")
            sent.append(pieces)
        cpu = procstat.run_seconds(path.relay_pids) - cpu_before
        out.append({"relay": name, "chunks_in": chunks, "downloads": downloads, "chunks_out": max(sent),
                    "seconds": (time.monotonic() - started) / downloads, "cpu_seconds": cpu / downloads})
        log(f"{chunks:,} one-byte chunks through {name}: {cpu / downloads * 1e3:.2f} ms CPU each, "
            f"{max(sent):,} chunks out")
    reference = out[-1]["cpu_seconds"]
    for row in out:
        row["ratio_to_haproxy"] = row["cpu_seconds"] / reference if reference else None
    return out


def run(results_dir: Path, work_dir: Path, *, keys: list[str], workloads: list[Workload], seconds: float,
        rounds: int, warmup: float, big_bytes: int, with_chart: bool, stem: str, scale_size=None,
        tiny: int = 0) -> int:
    """The paths ``keys`` (none: skipped), ``big_bytes`` up and down, an answer of ``tiny``
    one-byte chunks (0: skipped) and, given ``scale_size``, the scale measurements (bench/scale.py)."""
    results = {"machine": machine(), "settings": {
        "seconds": seconds, "rounds": rounds, "warmup_seconds": warmup, "wrk": "-t2 (-t1 at c1) --timeout 5s",
        "workloads": [w.__dict__ for w in workloads] if keys else [], "big_bytes": big_bytes, "tiny_chunks": tiny,
        "worker_logging": "info, json (the default config): one access log line per request to a file",
        "southbound_agents_tls": False,
    }, "paths": {}}
    with Lab(work_dir, big_bytes) as lab:
        paths = build_paths(lab, keys) if keys else []
        check(paths, workloads)
        luas = {w.name: load.script(w, work_dir) for w in workloads}
        if warmup:
            first = workloads[0]
            for path in paths:
                load.run(path.url(first.path), first, luas[first.name], warmup,
                         path.headers(first.method, first.path), path.prefix)
        raw: dict[str, dict[str, list[dict]]] = {p.key: {w.name: [] for w in workloads} for p in paths}
        for r in range(rounds if paths else 0):
            for workload in workloads:
                # Rotate the order each round so that no path always runs first or last.
                shift = (r + workloads.index(workload)) % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    result = measure(path, workload, luas[workload.name], seconds)
                    raw[path.key][workload.name].append(result)
                    log(f"round {r + 1}/{rounds} {workload.name:14} {path.key:10} {result['rps']:9,.0f} req/s "
                        f"p99 {result['p99_us'] / 1000:7.2f} ms cpu {result['cpu_us_per_request']:6.0f} µs/req"
                        + (f" ERRORS {result['errors']}" if result["errors"] else ""))
        for path in paths:
            rss_pids = path.worker_pids or path.relay_pids
            results["paths"][path.key] = {
                "title": path.title,
                "peak_rss_mib": max(procstat.peak_rss_mib(pid) for pid in rss_pids),
                "workloads": {name: report.summarise(runs) for name, runs in raw[path.key].items()},
                "raw": raw[path.key],
            }
        if big_bytes:
            results["big_bodies"] = big_bodies(lab)
        if tiny:
            results["tiny_chunks"] = tiny_chunks(lab, tiny)
        if scale_size is not None:
            from . import scale

            results["scale"] = scale.run(lab, scale_size)
            results["scale"]["sizing"] = report.sizing(results["scale"])
    results["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    report.add_ratios(results)
    results["headlines"] = {key: report.headline(results, key) for key in NODE_KEYS if key in results["paths"]}
    written = report.write(results, results_dir, stem, with_chart)
    print()
    print(report.markdown(results))
    for path in written:
        log(f"wrote {path}")
    broken = [f"{key}/{name}" for key, p in results["paths"].items() for name, s in p["workloads"].items()
              if s["status_errors"] or not s["requests"]]
    if broken:
        print(f"FAILED: non-2xx answers or no requests on {', '.join(broken)}: these numbers measure errors", file=sys.stderr)
    for head in results["headlines"].values():
        print(report.headline_text(head))
    failed_scale = []
    if "scale" in results:
        print(report.sizing_text(results["scale"]))
        failed_scale = [name for name in ("connections_curve", "idle_connections", "southbound_agents")
                        if report.scale_errors(results["scale"], name)]
        if failed_scale:
            print(f"FAILED: errors in scale/{', scale/'.join(failed_scale)}", file=sys.stderr)
    return 1 if broken or failed_scale else 0
