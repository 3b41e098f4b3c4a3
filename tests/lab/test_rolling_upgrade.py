"""A rolling upgrade of site A's three nodes under load, with the playbook's steps (lab/upgrade.py).

A bounded northbound GET load (16 client threads, 100 requests/s, at most 20 s) runs from
site A's agent namespace to 10.1.2.3:2002 while every node in turn is drained on both
balancers, left idle, has its workers stopped (SIGTERM) and started again, passes its
health checks and is put back. No GET may fail, and every node must have come back with
new workers and be UP on both balancers.
"""

from __future__ import annotations

import pytest

from lab import load as load_run
from lab import upgrade
from lab.runner import Lab

pytestmark = pytest.mark.netns

SITE = "site-a"
RATE, SECONDS, THREADS = 100, 20, 16


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
        result = load_run.finish(load, SECONDS)
    total = result["ok"] + result["failed"]
    print(f"\nrolling upgrade of {', '.join(nodes)}: "
          + ", ".join(f"{n} out {s:.1f} s" for n, s in out_of_rotation.items())
          + f"; {total} GETs in {result['seconds']} s: {result['failed']} failed, {result['client_retries']} client retries, "
          f"{result['slower_than_1s']} slower than 1 s {result['slow']}")
    print("\n".join(steps))
    assert still_loading, "the upgrade outlasted the load: it was not tested under load to the end"
    assert result["failed"] == 0, result["reasons"]
    assert total >= RATE * SECONDS * 0.9, result
    for name in nodes:
        new = {k: v for k, v in lab.nodes[name].pids.items() if k.startswith("worker-")}
        assert new.keys() == old_pids[name].keys() and not set(new.values()) & set(old_pids[name].values()), name
        for balancer in balancers:
            assert upgrade.lb(lab, balancer, "status", name).startswith(f"nodes/{name}: UP,")
