"""`make demo`: the scenario (lab/scenario.py) on the namespace lab.

The namespace lab's own steps around it: build the namespaces and start the processes
first; at the end, tear down and check that no namespace, veth or process is left.
Exit status 0 only if every step passed.
"""

from __future__ import annotations

from typing import Callable

from kit import netns

from . import scenario
from .runner import Lab
from .scenario import expect


def root_veths() -> set[str]:
    """veth interfaces in the root namespace (the lab must never add one)."""
    out = netns.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def torn_down(lab: Lab, veths_before: set[str] | None = None) -> str:
    recorded = list(lab.processes.values())
    namespaces = list(lab.namespaces)
    problems = lab.down()
    expect(not problems, "; ".join(problems))
    left_ns = [n for n in netns.names() if n.startswith(lab.prefix)]
    expect(not left_ns, f"namespaces left: {left_ns}")
    left_pids = [p.pid for p in recorded if p.alive()]
    expect(not left_pids, f"processes left: {left_pids}")
    if veths_before is not None:
        added = root_veths() - veths_before
        expect(not added, f"veth interfaces appeared in the root namespace: {sorted(added)}")
    return f"{len(recorded)} processes stopped, {len(namespaces)} namespaces deleted; none left with prefix {lab.prefix}"


def run(lab: Lab, say: Callable[[str], None] = print) -> bool:
    topo = lab.topology
    node_count = len(topo.by_role("proxy-node"))
    veths_before = root_veths()
    bring_up = [
        ("build namespaces, links and routes; apply node and gateway firewalls",
         lambda: (lab.build(), f"{len(lab.namespaces)} namespaces ({lab.prefix}*); rules checked with iptables-restore --test, then applied")[1]),
        (f"start the upstream, {node_count} nodes ({topo.workers} workers + HAProxy front each; front.mode "
         f"{', '.join(f'{s.front_mode} on {s.name}' for s in topo.sites.values())}) and the balancer pair",
         lambda: (lab.start_services(), f"{len(lab.processes)} processes, each answering")[1]),
    ]
    tear_down = ("tear down: no namespace, veth or process left", lambda: torn_down(lab, veths_before))
    return scenario.run(lab, f"agent-proxy namespace lab: {len(topo.hosts)} hosts, work directory {lab.workdir}",
                        bring_up, tear_down, say, logs=f"{lab.workdir}/logs")
