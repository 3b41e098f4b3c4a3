"""Rotating a proxy's shared secret with no failed request (the procedure in
app/agent_proxy/reference/README.md): the upstream holds the new and the old secret, then
each node gets the new one and reloads, then the upstream drops the old one.

Real processes on loopback: the reference control plane (HTTPS) and a real
`agent-proxy serve` worker; agents' calls (POST /agent/v1/handshake) go through the
worker, which signs them, in a bounded loop while the worker's secret changes under it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import urllib3

from kit import AGENT_PROXY, REPO, Process, free_port, start_worker, wait_for_port, wait_until, write_config

OLD, NEW = "old-secret-" + "0" * 32, "new-secret-" + "1" * 32
MAX_REQUESTS, MAX_SECONDS = 400, 20


def start_upstream(tmp_path, port: int, *secrets_: str) -> Process:
    specs = []
    for i, secret in enumerate(secrets_):
        (tmp_path / f"site-a-{i}.psk").write_text(secret + "\n")
        specs += ["--proxy", f"site-a={tmp_path / f'site-a-{i}.psk'}"]
    proc = Process("upstream", [
        sys.executable, "-m", "agent_proxy.reference.upstream", "--listen", f"127.0.0.1:{port}",
        "--self-signed", "127.0.0.1", "--write-cert", str(tmp_path / "upstream.crt"), *specs,
    ], tmp_path / "upstream.log", env={"PYTHONPATH": str(REPO / "app")}).start()
    wait_for_port("127.0.0.1", port, proc=proc)
    return proc


def register(config) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT_PROXY, "register", "-c", str(config)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def rotation(tmp_path):
    """An upstream holding NEW then OLD for site-a, and a worker still holding OLD."""
    port = free_port()
    upstream = start_upstream(tmp_path, port, NEW, OLD)
    worker_dir = tmp_path / "worker"
    listen = free_port()
    config = write_config(worker_dir, f"https://127.0.0.1:{port}", public_url=f"http://127.0.0.1:{listen}",
                          listen={"host": "127.0.0.1", "port": listen},
                          upstream={"ca_file": str(tmp_path / "upstream.crt")})
    (worker_dir / "psk").write_text(OLD + "\n")
    worker = start_worker(config, tmp_path)
    try:
        yield {"upstream": upstream, "worker": worker, "config": config, "psk": worker_dir / "psk",
               "url": f"http://127.0.0.1:{listen}"}
    finally:
        worker.stop()
        upstream.stop()


def test_the_upstream_accepts_both_secrets_and_the_node_switches_under_load(rotation):
    # Registration while the node still has the old secret: the upstream's handshake call,
    # signed with the new secret first, is refused by the node and signed again with the old.
    first = register(rotation["config"])
    assert first.returncode == 0, first.stderr

    answers: list[int | str] = []
    stop = threading.Event()

    def load():
        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=20))
        deadline = time.monotonic() + MAX_SECONDS
        while not stop.is_set() and len(answers) < MAX_REQUESTS and time.monotonic() < deadline:
            body = json.dumps({"instance_id": f"agent-{len(answers)}", "token": "t" * 24, "port": 2003})
            try:
                response = http.request("POST", rotation["url"] + "/agent/v1/handshake", body=body,
                                        headers={"Content-Type": "application/json"})
                answers.append(response.status)
            except urllib3.exceptions.HTTPError as exc:
                answers.append(f"error: {exc}")

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    wait_until(lambda: len(answers) >= 20, 15, "20 agent calls through the node before the switch")
    rotation["psk"].write_text(NEW + "\n")
    rotation["worker"].signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in rotation["worker"].output(), 10, "the worker reloads")
    switched_at = len(answers)
    wait_until(lambda: len(answers) >= switched_at + 20, 15, "20 agent calls through the node after the switch")
    stop.set()
    thread.join(MAX_SECONDS + 10)

    failed = [a for a in answers if a != 200]
    assert not failed, f"{len(failed)} of {len(answers)} agent calls failed during the rotation: {failed[:5]}"
    # Now signed with the new secret, which the upstream tries first.
    again = register(rotation["config"])
    assert again.returncode == 0, again.stderr
    assert "signature-rejected" not in rotation["upstream"].output()


def test_an_upstream_without_the_nodes_secret_still_refuses_it(tmp_path):
    port = free_port()
    upstream = start_upstream(tmp_path, port, NEW)
    config = write_config(tmp_path / "worker", f"https://127.0.0.1:{port}", upstream={"ca_file": str(tmp_path / "upstream.crt")})
    (tmp_path / "worker" / "psk").write_text(OLD + "\n")
    try:
        result = register(config)
        assert result.returncode == 1 and "refused this proxy's signature: signature does not match" in result.stderr
    finally:
        upstream.stop()
