"""A rolling upgrade of site A's three nodes under load, with the playbook's steps (lab/upgrade.py).

A bounded northbound GET load (16 client threads, 100 requests/s, at most 120 s, ended by
SIGTERM once the upgrade is done) runs from site A's agent namespace to 10.1.2.3:2002 while every node in turn is drained on both
balancers, left idle, has its workers stopped (SIGTERM) and started again, passes its
health checks and is put back. No GET may fail, and every node must have come back with
new workers and be UP on both balancers.
"""

from __future__ import annotations

import pytest

from kit import wait_until
from lab import load as load_run
from lab import upgrade
from lab.runner import Lab

pytestmark = pytest.mark.netns

SITE = "site-a"
RATE, SECONDS, THREADS = 100, 120, 16  # SECONDS: the bound; the load ends with the upgrade


def test_every_node_upgraded_under_load_and_no_get_failed(site_lab: Lab):
    lab = site_lab
    nodes = lab.topology.sites[SITE].nodes
    balancers = lab.topology.sites[SITE].balancers
    old_pids = {n: {k: v for k, v in lab.nodes[n].pids.items() if k.startswith("worker-")} for n in nodes}
    steps: list[str] = []
    load = load_run.start(lab, SITE, RATE, SECONDS, THREADS)
    try:
        out_of_rotation = upgrade.rolling_upgrade(lab, SITE, say=steps.append)
        still_loading = load.poll() is None
    finally:
        load.terminate()  # lab.load stops sending and prints what it saw
        result = load_run.finish(load, SECONDS)
    total = result["ok"] + result["failed"]
    print(f"\nrolling upgrade of {', '.join(nodes)}: "
          + ", ".join(f"{n} out {s:.1f} s" for n, s in out_of_rotation.items())
          + f"; {total} GETs in {result['seconds']} s: {result['failed']} failed, {result['client_retries']} client retries, "
          f"{result['slower_than_1s']} slower than 1 s {result['slow']}")
    print("\n".join(steps))
    assert still_loading, "the upgrade outlasted the load: it was not tested under load to the end"
    assert result["failed"] == 0, result["reasons"]
    assert total >= RATE * result["seconds"] * 0.9, result  # paced at RATE the whole time
    for name in nodes:
        new = {k: v for k, v in lab.nodes[name].pids.items() if k.startswith("worker-")}
        assert new.keys() == old_pids[name].keys() and not set(new.values()) & set(old_pids[name].values()), name
        for balancer in balancers:
            # Fully UP, not "UP 1/2" (one check lost on a busy machine): bounded, as HAProxy counts.
            wait_until(lambda: upgrade.lb(lab, balancer, "status", name).startswith(f"nodes/{name}: UP,"), 10,
                       f"{name} fully UP on {balancer}")
