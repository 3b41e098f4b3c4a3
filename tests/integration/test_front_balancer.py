"""The balancer (haproxy/lb-haproxy.cfg.j2) as a real HAProxy before three real node fronts.

The balancer listens on loopback and connects to the node fronts from 127.0.0.1, the one
address their front.balancers allows to send a PROXY header; the test's clients connect
to the balancer from 127.0.0.5, the address the origin must see.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import urllib3
import yaml

from kit import (
    all_up, free_port, headers_of, render, run_load, server_stats, start_haproxy, start_node, start_origin,
    wait_for_port, wait_until, write_config,
)

CLIENT = "127.0.0.5"
CHECK_INTER, CHECK_FALL = 1, 2  # seconds, checks


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    proc, url = start_origin(tmp_path_factory.mktemp("origin"))
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def nodes(origin, tmp_path_factory):
    started = []
    try:
        for index in range(1, 4):
            started.append(start_node(tmp_path_factory.mktemp(f"node{index}"), origin, workers=1, balancers=["127.0.0.1/32"], name=f"node{index}"))
        yield started
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="module")
def balancer(nodes, origin, tmp_path_factory):
    directory = tmp_path_factory.mktemp("balancer")
    port, monitor_port = free_port(), free_port()
    socket_path = str(directory / "haproxy.sock")
    config = write_config(directory, origin, upstream={"read_timeout": 10},
                          front={"bind": "127.0.0.1", "port": port, "stats_socket": socket_path})
    variables = directory / "nodes.yaml"
    variables.write_text(yaml.safe_dump({"nodes": [
        {"name": f"node{index}", "address": "127.0.0.1", "port": node.port} for index, node in enumerate(nodes, 1)
    ]}))
    proc = start_haproxy(
        render("lb-haproxy", config, str(variables), f"monitor_port={monitor_port}", "log_format=raw",
               f"check_inter={CHECK_INTER}s", f"check_fall={CHECK_FALL}"),
        directory, "balancer",
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        # HAProxy may open the front's port before its stats socket: all_up counts a socket
        # not there yet as "not yet" (a make test run failed on the bare call).
        wait_until(lambda: all_up(socket_path, "nodes"), 10, "all nodes UP in the balancer")
        yield {"url": f"https://127.0.0.1:{port}", "socket": socket_path, "monitor": f"http://127.0.0.1:{monitor_port}/_lb/health", "proc": proc}
    finally:
        proc.stop()


def client(retries) -> urllib3.PoolManager:
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    # Each node has its own self-signed certificate here; the balancer passes TLS through.
    return urllib3.PoolManager(maxsize=16, block=True, retries=retries, cert_reqs="CERT_NONE",
                               source_address=(CLIENT, 0), timeout=urllib3.Timeout(connect=5, read=20))


def test_balancer_spreads_over_nodes_and_carries_the_client_address(balancer):
    http = client(retries=False)
    for _ in range(30):  # a connection each: the balancer spreads connections
        response = http.request("GET", balancer["url"] + "/echo", headers={"X-Forwarded-For": "10.6.6.6", "Connection": "close"})
        assert response.status == 200
        assert headers_of(json.loads(response.data))["x-agent-proxy-client-ip"] == [CLIENT]
    served = {name: int(row["stot"]) for name, row in server_stats(balancer["socket"], "nodes").items()}
    assert all(count > 0 for count in served.values()), served
    assert urllib3.request("GET", balancer["monitor"], retries=False).status == 200


def test_losing_a_node_under_load_fails_no_get(balancer, nodes):
    """A node dies (its HAProxy and worker, SIGKILL) while 16 clients send 2,000 requests.

    The balancer passes TCP through, so it can only send new connections elsewhere: a
    request in flight on the dead node is lost with its connection, and the client sends it
    again as HTTP clients do for idempotent requests (urllib3's default Retry: GET yes,
    POST no). No GET may fail; failed POSTs are counted and reported.
    """
    victim = nodes[1]
    killed_at: list[float] = []

    def kill_node() -> None:
        os.killpg(victim.haproxy.pid, signal.SIGKILL)  # master and worker: one process group we started
        for worker in victim.workers.values():
            worker.signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    down_after: list[float] = []

    def watch() -> None:
        wait_until(lambda: bool(killed_at), 20, "the node is killed")
        wait_until(
            lambda: server_stats(balancer["socket"], "nodes")["node2"]["status"].startswith("DOWN"),
            10, "the balancer marks the dead node DOWN",
        )
        down_after.append(time.monotonic() - killed_at[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    retry = urllib3.Retry(total=3, connect=3, read=2, backoff_factor=0, raise_on_status=False)
    result = run_load(client(retry), balancer["url"], total=2000, threads=16, at=500, action=kill_node, post_every=10, limit=15)
    watcher.join(15)
    print(f"GET ok {result.ok['GET']}, POST ok {result.ok['POST']}, POST failed {len(result.failed['POST'])}, "
          f"client retries {result.client_retries}, node DOWN after {down_after} s, {result.seconds:.1f} s")
    assert result.failed["GET"] == [], result.failed["GET"][:5]
    assert result.ok["GET"] == 1800
    # DOWN after CHECK_FALL failed checks, CHECK_INTER apart: 2-3 s on a calm machine. The
    # bound leaves room for a busy one; a check interval left at HAProxy's default (2 s,
    # 3 falls) would still miss it.
    assert down_after, "the balancer never marked the dead node DOWN"
    assert down_after[0] <= CHECK_INTER * CHECK_FALL + 3, f"DOWN after {down_after[0]:.1f} s"
    assert urllib3.request("GET", balancer["monitor"], retries=False).status == 200
