"""python -m bench [--smoke | --scale | --profile] [options]: see bench/README.md."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds: every server is stopped by PID


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Relay paths side by side: throughput, latency, CPU, memory.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="every path for ~1 s, one workload, and a small scale run: checks the harness, asserts no performance")
    mode.add_argument("--scale", action="store_true", help="how cost grows: the knee up to 1,024 connections, 10,000 idle agents held, 20,000 agents called southbound (a few minutes)")
    mode.add_argument("--profile", action="store_true", help="py-spy on one worker under load; prints the top functions by own time")
    mode.add_argument("--costs", action="store_true", help="where the native front's CPU goes: it as rendered and without client TLS, "
                      "the access line or the signature, beside HAProxy alone")
    parser.add_argument("--seconds", type=float, help="per measurement (default 4; smoke 1; profile 10; costs 3)")
    parser.add_argument("--rounds", type=int, help="rounds of all paths and workloads (default 3; smoke 1)")
    parser.add_argument("--paths", default="direct,haproxy,worker,node,node-native,southbound",
                        help="comma-separated, in this order (default: the six paths; also worker-unpinned)")
    parser.add_argument("--top", type=int, default=30, help="--profile: functions to print")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go (default: bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, server logs)")
    args = parser.parse_args(argv)

    from . import run, scale  # after argument parsing: --help needs nothing installed
    from .costs import costs

    keys = [k.strip() for k in args.paths.split(",") if k.strip()]
    unknown = [k for k in keys if k not in run.PATH_KEYS]
    if unknown or not keys:
        parser.error(f"--paths: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(run.PATH_KEYS)}")
    if os.geteuid() != 0:
        parser.error("run as root: nginx and HAProxy bind as root and the southbound path creates network namespaces")
    if args.seconds is not None and not (1 <= args.seconds <= 60 and args.seconds == int(args.seconds)):
        parser.error("--seconds must be a whole number from 1 to 60 (wrk counts whole seconds)")
    if args.rounds is not None and not 1 <= args.rounds <= 9:
        parser.error("--rounds must be between 1 and 9")

    signal.signal(signal.SIGTERM, _stop)
    work_dir = Path(tempfile.mkdtemp(prefix="apbench-"))
    started = time.monotonic()
    try:
        if args.profile:
            from .profile import profile

            return profile(work_dir, args.results, args.seconds or 10, args.top)
        with_chart = importlib.util.find_spec("matplotlib") is not None
        if not with_chart:  # `make bench` installs it (the bench extra); the smoke does without
            print("[bench] matplotlib missing: no chart (pip install -e 'app[bench]')")
        if args.costs:
            return costs(work_dir, args.results, args.seconds or 3, args.rounds or 3, time.strftime("bench-%Y%m%d-%H%M%S-costs"))
        if args.smoke:
            status = run.run(args.results, work_dir, keys=keys, workloads=run.SMOKE_WORKLOADS,
                             seconds=args.seconds or 1, rounds=args.rounds or 1, warmup=0, big_bytes=4 * 2**20,
                             with_chart=with_chart, stem="smoke", scale_size=scale.SMOKE, tiny=20_000)
            return status or costs(work_dir / "costs", args.results, 1, 1, "smoke-costs")
        if args.scale:
            return run.run(args.results, work_dir, keys=[], workloads=[], seconds=0, rounds=0, warmup=0,
                           big_bytes=0, with_chart=with_chart, stem=time.strftime("bench-%Y%m%d-%H%M%S-scale"),
                           scale_size=scale.FULL)
        return run.run(args.results, work_dir, keys=keys, workloads=run.WORKLOADS,
                       seconds=args.seconds or 4, rounds=args.rounds or 3, warmup=1, big_bytes=100 * 2**20,
                       with_chart=with_chart, stem=time.strftime("bench-%Y%m%d-%H%M%S"), tiny=200_000)
    finally:
        if args.keep:
            print(f"[bench] work directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir)
        print(f"[bench] {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
