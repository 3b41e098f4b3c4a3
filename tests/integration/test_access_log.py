"""Access lines as an operator greps them: the proxy's own error code, the origin's time,
health checks left out unless asked for. A real worker, a real origin, urllib3."""

from __future__ import annotations

import json
import threading

import pytest
import urllib3
import yaml

from kit import free_port, start_worker, wait_until, write_config
from tests.origin import Origin


@pytest.fixture(scope="module")
def origin():
    origin = Origin().start()
    yield origin
    origin.stop()


def access_lines(proc) -> list[dict]:
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "agent_proxy.access"]


def serve(tmp_path, upstream_url: str, limits: dict | None = None, **logging):
    config = write_config(tmp_path, upstream_url, logging={"level": "info", "format": "json", **logging}, limits=limits or {})
    proc = start_worker(config, tmp_path)
    return proc, f"http://127.0.0.1:{yaml.safe_load(config.read_text())['listen']['port']}"


def test_a_relayed_answer_logs_the_origins_time_and_no_error(origin, tmp_path):
    proc, url = serve(tmp_path, origin.url)
    try:
        assert urllib3.request("GET", url + "/slow?s=0.3", retries=False).status == 200
        assert urllib3.request("GET", url + "/status/502", retries=False).status == 502
        wait_until(lambda: len(access_lines(proc)) == 2, 5, "two access lines")
        slow, relayed_502 = access_lines(proc)
        assert 300 <= slow["origin_ms"] <= slow["duration_ms"] and "error" not in slow
        # The origin's own 502 is relayed: it is not the proxy's error.
        assert relayed_502["status"] == 502 and "error" not in relayed_502 and "origin_ms" in relayed_502
        assert slow["outcome"] == relayed_502["outcome"] == "complete"
    finally:
        proc.stop()


def test_a_proxy_made_error_logs_its_code(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    proc, url = serve(tmp_path, closed)
    try:
        answer = urllib3.request("GET", url + "/agent/checkin", retries=False)
        assert answer.status == 502 and answer.headers["X-Agent-Proxy-Error"] == "upstream-unreachable"
        assert urllib3.request("GET", url + "/_proxy/nothing", retries=False).status == 404
        wait_until(lambda: len(access_lines(proc)) == 2, 5, "two access lines")
        unreachable, not_found = access_lines(proc)
        assert unreachable["error"] == "upstream-unreachable" and unreachable["origin_ms"] >= 0
        assert not_found["error"] == "not-found" and "origin_ms" not in not_found
        # The proxy answered itself instead of relaying: refused.
        assert unreachable["outcome"] == not_found["outcome"] == "refused"
    finally:
        proc.stop()


def test_an_overload_refusal_logs_its_code_and_outcome(origin, tmp_path):
    proc, url = serve(tmp_path, origin.url, limits={"threads": 2, "max_in_flight": 2})
    try:
        # Slow enough to be still in flight when the refused call comes on a busy machine.
        seen = len(origin.received)
        slow = [threading.Thread(target=urllib3.request, args=("GET", url + "/slow?s=2"), kwargs={"retries": False, "timeout": 10})
                for _ in range(2)]
        for thread in slow:
            thread.start()
        wait_until(lambda: origin.arrivals("/slow", since=seen) >= 2, 5, "both slow requests reach the origin")
        answer = urllib3.request("GET", url + "/agent/checkin", retries=False)
        assert answer.status == 503 and answer.headers["X-Agent-Proxy-Error"] == "overloaded"
        for thread in slow:
            thread.join(10)
        wait_until(lambda: len(access_lines(proc)) == 3, 5, "three access lines")
        refused = next(line for line in access_lines(proc) if line["status"] == 503)
        assert refused["error"] == "overloaded" and refused["outcome"] == "refused"
        assert refused["direction"] == "northbound" and refused["target"] == "/agent/checkin"
        assert refused["client_ip"] == "127.0.0.1" and refused["bytes_out"] == len(answer.data)
        assert [line["outcome"] for line in access_lines(proc) if line["status"] == 200] == ["complete", "complete"]
    finally:
        proc.stop()


@pytest.mark.parametrize("access_health", [False, True])
def test_health_checks_are_logged_only_when_asked(origin, tmp_path, access_health):
    proc, url = serve(tmp_path, origin.url, access_health=access_health)
    try:
        for path in ("/_proxy/health", "/_proxy/ready", "/_proxy/features"):
            assert urllib3.request("GET", url + path, retries=False).status == 200
        expected = ["/_proxy/health", "/_proxy/ready", "/_proxy/features"] if access_health else ["/_proxy/features"]
        wait_until(lambda: len(access_lines(proc)) == len(expected), 5, "the access lines")
        assert [line["target"] for line in access_lines(proc)] == expected
    finally:
        proc.stop()
