"""A bounded GET load, run inside a lab namespace: `ip netns exec NS python -m lab.load ...`.

Prints one JSON object: ok, failed (count and the first reasons), client retries, and the
seconds it ran. Bounded twice: at most ``--rate * --seconds`` requests, and it stops
sending at ``--seconds + 10``; SIGTERM ends it earlier (the result is printed all the
same), for a load that lasts as long as a step of unknown length. Requests are paced at ``--rate`` per second (0: as fast as
the threads go). The client behaves as an agent's HTTP client does: keep-alive
connections, and a GET whose connection failed, was cut, or got no answer within 4 s is
sent again on a new connection after a short backoff (urllib3's Retry); a 5xx answer is a
failure. Requests slower than 1 s are listed (when they were sent, how long they took).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import urllib3

from . import netns


def run(url: str, ca_file: str, rate: float, seconds: float, threads: int, stop: threading.Event | None = None) -> dict:
    retry = urllib3.Retry(total=6, connect=6, read=2, status=0, redirect=0, backoff_factor=0.2,
                          allowed_methods={"GET"})
    http = urllib3.PoolManager(maxsize=threads, block=True, retries=retry, ca_certs=ca_file,
                               timeout=urllib3.Timeout(connect=3, read=4))
    total = int(rate * seconds) if rate else 1_000_000
    lock, counter = threading.Lock(), iter(range(total))
    ok, failed, retried, reasons, slow = [0], [0], [0], [], []
    start = time.monotonic()
    stop_at = start + seconds + 10

    def loop() -> None:
        while True:
            with lock:
                index = next(counter, None)
            now = time.monotonic()
            if index is None or now >= stop_at or (not rate and now >= start + seconds) or (stop and stop.is_set()):
                return
            if rate:
                time.sleep(max(0.0, start + index / rate - now))
            sent = time.monotonic()
            try:
                answer = http.request("GET", f"{url}?i={index}")
                good, reason = answer.status == 200, f"status {answer.status}: {answer.data[:120]!r}"
                retries = len(answer.retries.history) if answer.retries else 0
            except Exception as exc:  # every kind of failure counts
                good, reason, retries = False, repr(exc)[:200], 0
            took = time.monotonic() - sent
            with lock:
                retried[0] += retries
                if took > 1:
                    slow.append(f"{sent - start:.2f} s: {took:.2f} s")
                if good:
                    ok[0] += 1
                else:
                    failed[0] += 1
                    if len(reasons) < 5:
                        reasons.append(f"{time.monotonic() - start:.2f} s: {reason}")

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(seconds + 60)
    return {"ok": ok[0], "failed": failed[0], "reasons": reasons, "client_retries": retried[0], "slower_than_1s": len(slow), "slow": slow[:5],
            "seconds": round(time.monotonic() - start, 2)}


def start(lab, site_name: str, rate: float, seconds: float, threads: int) -> subprocess.Popen:
    """This load from the site's first agent's namespace to the site address, in the background."""
    site = lab.topology.sites[site_name]
    argv = netns.prefix(lab.ns(site.agents[0])) + [
        sys.executable, "-m", "lab.load", "--url", f"https://{site.site_address}:{lab.topology.proxy_port}/",
        "--ca-file", str(lab.workdir / "sites" / site.name / "tls" / "proxy.crt"),
        "--rate", str(rate), "--seconds", str(seconds), "--threads", str(threads)]
    return subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(load: subprocess.Popen, seconds: float) -> dict:
    """Its result, once it ended (the load stops itself by ``seconds + 10``)."""
    out, err = load.communicate(timeout=seconds + 60)
    if load.returncode != 0:
        raise RuntimeError(f"python -m lab.load exited with {load.returncode}: {err.strip()}")
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. https://10.1.2.3:2002/")
    parser.add_argument("--ca-file", required=True, help="the certificate to verify the proxy with")
    parser.add_argument("--rate", type=float, default=100, help="requests per second (0: unpaced; default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10, help="how long (default %(default)s)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default %(default)s)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps(run(args.url, args.ca_file, args.rate, args.seconds, args.threads, stop)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
