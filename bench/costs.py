"""Where the native front's CPU goes (`python -m bench --costs`).

The node front in `front.mode: native` as rendered, and variants of the same rendered file
with one part taken out (TLS on the client side, the access line, the signature), side by
side with HAProxy alone, in alternating rounds: the CPU of the HAProxy processes per
200-byte GET at 32 connections. A variant is a diagnostic, never a way to run a node: the
contract needs all three parts on every request.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kit import Process, free_port

from . import load, procstat
from .paths import Lab, haproxy_alone_config

WORKLOAD = load.Workload("get-200B-c32", "GET", "/small", 32)


def _without(text: str, *markers: str) -> str:
    """``text`` without its lines that contain one of ``markers``."""
    return "".join(line for line in text.splitlines(keepends=True) if not any(m in line for m in markers))


def _no_tls(text: str) -> str:
    """The client-side bind without `ssl crt ...` (the first bind: the agents' frontend)."""
    plain, count = re.subn(r"^(\s*bind \S+) ssl crt \S+", r"\1", text, count=1, flags=re.M)
    if not count:
        raise RuntimeError("--costs: the rendered native front has no `bind ... ssl crt` line to take TLS out of")
    return plain


# (name, change of the rendered file, whether its client side speaks TLS)
_ACCESS_LOG = ("log ",)
_SIGNATURE = ("X-Agent-Proxy-Signature", "txn.ap_signed")
VARIANTS = (
    ("as rendered", lambda t: t, True),
    ("no access line", lambda t: _without(t, *_ACCESS_LOG), True),
    ("no signature", lambda t: _without(t, *_SIGNATURE), True),
    ("no client TLS", _no_tls, False),
    ("none of the three", lambda t: _no_tls(_without(t, *_ACCESS_LOG, *_SIGNATURE)), False),
)


def _start(lab: Lab, name: str, text: str) -> tuple[Process, int]:
    """HAProxy on ``text`` with every listener moved to a free port (the node it was
    rendered for still runs) and a stats socket of its own; (it, the clients' port)."""
    slug = re.sub(r"\W+", "-", name)
    ports: list[int] = []

    def moved(match: re.Match) -> str:
        ports.append(free_port())
        return f"{match.group(1)}{ports[-1]}"

    text = re.sub(r"^(\s*bind \S+:)\d+", moved, text, flags=re.M)
    text = re.sub(r"stats socket \S+", f"stats socket {lab.dir}/costs-{slug}.sock", text)
    path = lab.dir / f"costs-{slug}.cfg"
    path.write_text(text)
    return _haproxy(lab, f"costs-{slug}", path, ports[0]), ports[0]


def _haproxy(lab: Lab, name: str, config: Path, port: int) -> Process:
    return lab._start(name, ["haproxy", "-f", str(config), "-db"], "127.0.0.1", port)


def costs(work_dir: Path, results_dir: Path, seconds: float, rounds: int, stem: str) -> int:
    work_dir.mkdir(parents=True, exist_ok=True)
    lua = load.script(WORKLOAD, work_dir)
    with Lab(work_dir) as lab:
        lab.origin()
        lab.native_node()
        text = next((work_dir / "node-native").glob("*haproxy.cfg")).read_text()
        targets: dict[str, tuple[str, Process]] = {}
        for name, change, tls in VARIANTS:
            proc, port = _start(lab, name, change(text))
            targets[name] = (f"{'https' if tls else 'http'}://127.0.0.1:{port}{WORKLOAD.path}", proc)
        port = free_port()
        alone = _haproxy(lab, "costs-haproxy-alone", haproxy_alone_config(lab.dir, port, lab.origin_port), port)
        targets["HAProxy alone"] = (f"http://127.0.0.1:{port}{WORKLOAD.path}", alone)
        rows: dict[str, list[dict]] = {name: [] for name in targets}
        for number in range(1, rounds + 1):
            for name, (url, proc) in targets.items():
                pids = procstat.with_children(proc.pid)   # the master and the worker it forked
                before = procstat.cpu_seconds(pids)
                result = load.run(url, WORKLOAD, lua, seconds)
                cpu = (procstat.cpu_seconds(pids) - before) / max(1, result["requests"]) * 1e6
                rows[name].append({"rps": result["rps"], "cpu_us_per_request": cpu, "errors": result["errors"]})
                print(f"[bench] costs round {number}/{rounds} {name:18s} {result['rps']:9,.0f} req/s "
                      f"cpu {cpu:6.1f} µs/req errors {result['errors']}", flush=True)
    lines = ["| front | CPU µs/req, each round | req/s, each round | errors |", "| --- | --- | --- | ---: |"]
    for name, measured in rows.items():
        cpu = ", ".join(f"{m['cpu_us_per_request']:.1f}" for m in measured)
        rps = ", ".join(f"{m['rps']:,.0f}" for m in measured)
        lines.append(f"| {name} | {cpu} | {rps} | {sum(m['errors'] for m in measured)} |")
    print("\n".join(lines))
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{stem}.json"
    out.write_text(json.dumps({"workload": WORKLOAD.name, "seconds": seconds, "rounds": rows}, indent=2))
    print(f"[bench] wrote {out}")
    return 1 if any(m["errors"] for measured in rows.values() for m in measured) else 0
