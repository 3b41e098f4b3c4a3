"""Reloads under a steady, bounded load: workers (SIGHUP), HAProxy (master-worker), nginx.

The load is 16 client threads, at most 1,500 requests and 15 s. Clients behave as HTTP/1.1
clients do: a GET sent on a keep-alive connection that the server closed while idle is
sent again on a new one (urllib3's retry on connection errors); anything else counts as
a failure, and the goal is none.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import urllib3
import yaml

from kit import (
    AGENT_PROXY, SECRET, Process, all_up, free_port, render, run_load, start_node, start_origin, start_worker,
    wait_for_port, wait_until, write_config,
)

ROOT = Path(__file__).resolve().parents[2]
TOTAL, THREADS, LIMIT = 1500, 16, 15
NGINX = "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    proc, url = start_origin(tmp_path_factory.mktemp("origin"))
    yield url
    proc.stop()


def client(ca: str) -> urllib3.PoolManager:
    retry = urllib3.Retry(total=2, connect=2, read=1, status=0, redirect=0, allowed_methods={"GET"})
    return urllib3.PoolManager(maxsize=THREADS, block=True, retries=retry, ca_certs=ca,
                               timeout=urllib3.Timeout(connect=5, read=20))


class Repeatedly:
    """``action`` every ``every`` seconds in a thread, from ``start()`` until ``stop()``,
    which waits for the action in progress and raises what any run of it raised: a
    reload that failed fails the test, and none runs after the test has stopped its front."""

    def __init__(self, action, every: float):
        self.action, self.every = action, every
        self.runs, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.every):
            try:
                self.action()
                self.runs += 1
            except Exception as exc:  # reported by stop(), in the test's thread
                self.errors.append(exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        assert not self._thread.is_alive(), "the repeated action did not end within 30 s"
        assert not self.errors, self.errors[:3]


def test_workers_reload_under_load_without_a_failed_request(origin, tmp_path):
    node = start_node(tmp_path, origin, workers=2, balancers=[])

    def hup_all():
        for proc in node.workers.values():
            proc.signal(signal.SIGHUP)
    hups = Repeatedly(hup_all, 0.3)
    try:
        result = run_load(client(str(node.cert)), node.url, TOTAL, THREADS, at=100, action=hups.start, limit=LIMIT)
        hups.stop()
        print(f"worker reloads: {result.ok['GET']} ok, {len(result.failed['GET'])} failed, {result.client_retries} client retries")
        assert result.failed["GET"] == [], result.failed["GET"][:5]
        reloads = sum(p.output().count("configuration reloaded") for p in node.workers.values())
        assert reloads >= 4, "the workers were not reloaded during the load"
    finally:
        hups.stop()
        node.stop()


def test_a_worker_reload_applies_a_new_allowlist_to_new_requests(origin, tmp_path):
    config = write_config(tmp_path, origin)
    proc = start_worker(config, tmp_path)
    url = f"http://127.0.0.1:{yaml.safe_load(config.read_text())['listen']['port']}/echo"
    http = urllib3.PoolManager(retries=False)
    try:
        assert http.request("GET", url).status == 200
        data = yaml.safe_load(config.read_text())
        data["networks"]["agents"] = ["10.0.0.0/24"]
        config.write_text(yaml.safe_dump(data))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in proc.output(), 5, "the worker logs the reload")
        response = http.request("GET", url)
        assert response.status == 403 and response.headers["X-Agent-Proxy-Error"] == "source-not-allowed"
    finally:
        proc.stop()


def test_haproxy_front_reloads_under_load_without_a_failed_request(origin, tmp_path):
    node = start_node(tmp_path, origin, workers=2, balancers=[])
    # HAProxy runs in master-worker mode; SIGUSR2 to the master is `systemctl reload`.
    reloads = Repeatedly(lambda: node.haproxy.signal(signal.SIGUSR2), 1.0)
    try:
        result = run_load(client(str(node.cert)), node.url, TOTAL, THREADS, at=100, action=reloads.start, limit=LIMIT)
        reloads.stop()
        print(f"haproxy reloads: {result.ok['GET']} ok, {len(result.failed['GET'])} failed, {result.client_retries} client retries")
        assert result.failed["GET"] == [], result.failed["GET"][:5]
        assert node.haproxy.output().count("Loading success") >= 2, node.haproxy.output()[-2000:]
        wait_until(lambda: all_up(node.stats_socket, "workers"), 10, "workers UP after the reloads")
    finally:
        reloads.stop()
        node.stop()


def test_nginx_front_reloads_under_load_without_a_failed_request(origin, tmp_path):
    ports = [free_port(), free_port()]
    front_port = free_port()
    config = write_config(tmp_path, origin, listen={"host": "127.0.0.1", "port": ports[0]},
                          front={"bind": "127.0.0.1", "port": front_port, "workers": 1})
    workers = [start_worker(config, tmp_path, port) for port in ports[:1]]
    conf = tmp_path / "nginx.conf"
    conf.write_text(render("node-nginx", config, f"nginx_pid={tmp_path / 'nginx.pid'}"))
    nginx = Process("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log").start()

    def reload():
        done = subprocess.run([NGINX, "-c", str(conf), "-s", "reload"], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
    reloads = Repeatedly(reload, 0.5)
    try:
        wait_for_port("127.0.0.1", front_port, proc=nginx)
        result = run_load(client(str(tmp_path / "proxy.crt")), f"https://127.0.0.1:{front_port}", TOTAL, THREADS, at=100,
                          action=reloads.start, limit=LIMIT)
        reloads.stop()  # before nginx stops: a reload after it would find no nginx
        print(f"nginx reloads: {reloads.runs}; {result.ok['GET']} ok, {len(result.failed['GET'])} failed, {result.client_retries} client retries")
        assert result.failed["GET"] == [], result.failed["GET"][:5]
        assert reloads.runs >= 1, "nginx was not reloaded during the load"
    finally:
        reloads.stop()
        nginx.stop()
        for proc in workers:
            proc.stop()


def test_start_up_logs_one_line_of_settings_and_a_reload_names_what_needs_a_restart(origin, tmp_path):
    config = write_config(tmp_path, origin)
    proc = start_worker(config, tmp_path)
    try:
        settings_lines = [json.loads(line) for line in proc.output().splitlines() if '"settings"' in line]
        assert len(settings_lines) == 1 and settings_lines[0]["message"] == "starting"
        started = settings_lines[0]
        assert started["settings"]["proxy_id"] == "site-a" and started["settings"]["networks.agents"] == ["127.0.0.0/8"]
        assert "limits.threads" in started["defaults"] and "proxy_id" not in started["defaults"]
        assert SECRET not in proc.output()

        data = yaml.safe_load(config.read_text())
        data["limits"] = {"threads": 4, "drain_seconds": 2}
        data["logging"] = {"level": "info", "format": "text"}
        config.write_text(yaml.safe_dump(data))
        for reloads in (1, 2):
            proc.signal(signal.SIGHUP)
            wait_until(lambda: proc.output().count("configuration reloaded") == reloads, 5, "the worker logs the reload")
        reloaded = [line for line in proc.output().splitlines() if "configuration reloaded" in line]
        # The log format changed with the reload (text from then on), and until a restart
        # every reload says which of its changes wait for one.
        assert all(not line.startswith("{") and "needs_restart=['limits.threads']" in line for line in reloaded), reloaded
    finally:
        proc.stop()


def run_exec_reload(config: Path, main_pid: int) -> subprocess.CompletedProcess:
    """The worker unit's ExecReload= lines, run as systemd runs them: in order, stopping at
    the first that fails (its status is what `systemctl reload` reports)."""
    unit = (ROOT / "appliance/systemd/agent-proxy@.service").read_text()
    for line in re.findall(r"^ExecReload=(.+)$", unit, re.MULTILINE):
        argv = [AGENT_PROXY if word == "/opt/agent-proxy/bin/agent-proxy"
                else str(config) if word == "/etc/agent-proxy/agent-proxy.yaml"
                else str(main_pid) if word == "$MAINPID" else word for word in line.split()]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return done
    return done


def test_the_worker_units_reload_fails_on_a_broken_config_and_signals_nothing(origin, tmp_path):
    config = write_config(tmp_path, origin)
    proc = start_worker(config, tmp_path)
    try:
        good = config.read_text()
        config.write_text(good + "limts: {}\n")
        refused = run_exec_reload(config, proc.pid)
        assert refused.returncode == 2 and "limts: unknown key (did you mean limits?)" in refused.stderr
        time.sleep(0.5)
        assert "reload" not in proc.output().replace(str(tmp_path), ""), "the worker was signalled despite the broken config"
        config.write_text(good)
        assert run_exec_reload(config, proc.pid).returncode == 0
        wait_until(lambda: "configuration reloaded" in proc.output(), 5, "the worker logs the reload")
    finally:
        proc.stop()
