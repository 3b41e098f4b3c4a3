"""The balancer pair: lb1 and lb2 share site A's address 10.1.2.3 through keepalived.

Under a bounded northbound load from site A's agent namespace (GET https://10.1.2.3:2002/,
through a balancer and a node to the upstream; 100 requests/s for 8 s), the active
balancer loses its HAProxy, and later the other one its keepalived (both SIGKILL). Each
time the address must reach the other balancer within 3 s (measured by polling
`ip -n NS addr`) and fewer than 1% of the GETs may fail. The client is an ordinary HTTP
client: it sends a GET again on a new connection when its connection failed (see
lab/load.py); the retries are reported.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from kit import netns, wait_until
from lab import load as load_run
from lab.runner import Lab

pytestmark = pytest.mark.netns

RATE, SECONDS, THREADS, KILL_AFTER = 100, 8, 16, 2.5
MAX_MOVE_SECONDS, MAX_FAILED_SHARE = 3.0, 0.01
SITE = "site-a"


@pytest.fixture(scope="module")
def lab(site_lab):
    yield site_lab
    # Leave the pair whole for the next module: every HAProxy and keepalived running again.
    for name in site_lab.topology.sites[SITE].balancers:
        site_lab.start_balancer(name)
    site_lab.wait_site_address(SITE)


def kill_active_under_load(lab: Lab, process: str) -> tuple[str, str, float, dict]:
    """SIGKILL the active balancer's ``process`` mid-load; returns (was active, now active, seconds to move, load result)."""
    active = lab.wait_site_address(SITE)
    load = load_run.start(lab, SITE, RATE, SECONDS, THREADS)
    try:
        time.sleep(KILL_AFTER)   # the load runs at full rate before the kill
        assert load.poll() is None, load.communicate()
        victim = lab.processes[f"{active}/{process}"]
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        standby = lab.wait_site_address(SITE, away_from=active, timeout=10)
        moved = time.monotonic() - killed
    finally:
        result = load_run.finish(load, SECONDS)
    return active, standby, moved, result


def report(what: str, active: str, standby: str, moved: float, result: dict) -> None:
    total = result["ok"] + result["failed"]
    print(f"\n{what}: 10.1.2.3 {active} -> {standby} in {moved:.2f} s; {total} GETs in {result['seconds']} s: "
          f"{result['failed']} failed ({100 * result['failed'] / max(total, 1):.2f}%), "
          f"{result['client_retries']} client retries, {result['slower_than_1s']} slower than 1 s {result['slow']}; {result['reasons']}")


def assert_survived(moved: float, result: dict) -> None:
    total = result["ok"] + result["failed"]
    assert moved < MAX_MOVE_SECONDS, f"the address took {moved:.2f} s to move"
    assert total >= RATE * SECONDS * 0.9, f"the load sent only {total} GETs: {result}"
    assert result["failed"] < MAX_FAILED_SHARE * total, result


def test_the_first_balancer_holds_the_site_address_and_both_serve(lab):
    assert lab.site_address_holders(SITE) == ["lb1"]
    for name in ("lb1", "lb2"):
        status, _ = lab.http(name, lab.nodes[name].address, 8404, "GET", "/_lb/health")
        assert status == 200, name


def test_the_active_balancers_haproxy_dies_under_load(lab):
    active, standby, moved, result = kill_active_under_load(lab, "front")
    report("HAProxy SIGKILL", active, standby, moved, result)
    assert (active, standby) == ("lb1", "lb2")
    assert_survived(moved, result)


def test_the_balancer_that_comes_back_does_not_take_the_address_back(lab):
    # nopreempt: every move cuts the connections through the balancer, so lb1 stays standby.
    log = lab.processes["lb1/keepalived"].log_path
    offset = os.path.getsize(log)
    lab.start_balancer("lb1")
    wait_until(lambda: "Entering BACKUP STATE" in open(log).read()[offset:], 10, "lb1's keepalived leaves FAULT")
    time.sleep(1.5)   # more than an advertisement interval: time enough for a wrong takeover to show
    assert lab.site_address_holders(SITE) == ["lb2"]


def test_the_active_balancers_keepalived_dies_under_load(lab):
    active, standby, moved, result = kill_active_under_load(lab, "keepalived")
    report("keepalived SIGKILL", active, standby, moved, result)
    assert (active, standby) == ("lb2", "lb1")
    assert_survived(moved, result)
    # keepalived's VRRP child leaves with its parent: nothing of it is left in lb2's namespace.
    assert not lab.processes["lb2/keepalived"].alive()
    argv_left = [open(f"/proc/{pid}/cmdline").read() for pid in netns.pids(lab.ns("lb2"))]
    assert not [a for a in argv_left if a.startswith("keepalived")], argv_left
