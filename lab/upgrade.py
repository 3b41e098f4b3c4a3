"""A rolling upgrade of a site's nodes in the lab: the steps of ansible/playbooks/rolling-upgrade.yml.

Per node, one after the other:
 1. `agent-proxy lb drain` on every balancer of the site (no new connections to the node;
    the balancers are told at once, here and in steps 3 and 6);
 2. reload the node's front (SIGUSR2): the old HAProxy process answers what it has, closes
    each keep-alive connection after its current answer (and idle ones at once), and so
    sends the clients back through the balancer to the other nodes; a TCP balancer cannot
    do that itself, it never sees a request;
 3. `agent-proxy lb wait-idle` on every balancer (the node carries no connection);
 4. stop the workers with SIGTERM (each drains and exits), then start them again: the
    "upgrade" (on a real node, the new wheel is installed in between);
 5. GET /_proxy/health on every worker port and through the front;
 6. `agent-proxy lb ready` on every balancer, which waits until the health checks say UP.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from kit import ProcessError, netns

from .runner import AGENT_PROXY, Lab, LabError

def lb(lab: Lab, balancer: str, action: str, server: str, timeout: float = 30) -> str:
    """`agent-proxy lb ACTION` inside the balancer's namespace, on every backend that has the
    node (`nodes`, and `control_nodes` with control traffic apart); its answer, one line per backend."""
    socket = str(Path(lab.nodes[balancer].directory) / "haproxy.sock")
    argv = [AGENT_PROXY, "lb", action, "--socket", socket, "--server", server,
            "--timeout", str(timeout)]
    result = netns.ns_run(lab.ns(balancer), argv, check=False, timeout=timeout + 30)
    if result.returncode != 0:
        raise LabError(f"{balancer}: agent-proxy lb {action} --server {server} failed (exit {result.returncode}): "
                       f"{result.stderr.strip()}")
    return "; ".join(result.stdout.splitlines())


def upgrade_node(lab: Lab, name: str, say: Callable[[str], None] = print, timeout: float = 30) -> float:
    """The six steps above for one node; returns the seconds it was out of rotation."""
    node = lab.nodes[name]
    balancers = lab.topology.sites[node.site].balancers
    started = time.monotonic()

    def step(text: str) -> None:
        say(f"{time.monotonic() - started:5.2f} s  {name}: {text}")

    on_every = _on_every(lab, balancers, name, step)
    on_every("drain")
    front = lab.processes[f"{name}/front"]
    if not front.alive():
        raise LabError(f"{name}'s front (pid {front.pid}) is not running")
    front.signal(signal.SIGUSR2)
    step("front reloaded (SIGUSR2): its old process closes each connection after its answer")
    on_every("wait-idle", timeout)
    for port in node.worker_ports:
        worker = lab.processes[f"{name}/worker-{port}"]
        try:
            worker.stop(timeout)   # SIGTERM: in-flight requests finish, then it exits
        except ProcessError as exc:
            raise LabError(f"{name}'s worker on {port}: {exc}") from None
        if worker.stopped != "stopped":
            raise LabError(f"{name}'s worker on {port}: {worker.stopped}")
    step(f"workers stopped (SIGTERM): {', '.join(map(str, node.worker_ports))}")
    for port in node.worker_ports:
        proc = lab.spawn(f"{name}/worker-{port}", name, [AGENT_PROXY, "serve", "-c", node.config_path, "--port", str(port)])
        node.pids[f"worker-{port}"] = proc.pid
    lab.save()
    for port in node.worker_ports:
        lab.wait_port(name, "127.0.0.1", port, f"{name}'s worker", lab.processes[f"{name}/worker-{port}"])
        lab.wait_http(name, "127.0.0.1", port, "/_proxy/health", f"{name}'s worker on {port}")
    lab.wait_http(name, node.address, node.front_port, "/_proxy/health", f"{name}'s front to its workers", tls=True)
    step(f"workers restarted (pids {', '.join(str(node.pids[f'worker-{p}']) for p in node.worker_ports)}), "
        f"health 200 on {', '.join(map(str, node.worker_ports))} and through the front")
    on_every("ready", timeout)
    return time.monotonic() - started


def _on_every(lab: Lab, balancers: tuple[str, ...], server: str, step: Callable[[str], None]):
    """`agent-proxy lb ACTION` on all balancers at once (they are independent); each answer is one step."""

    def run(action: str, timeout: float = 30) -> None:
        with ThreadPoolExecutor(max_workers=len(balancers)) as pool:
            answers = list(pool.map(lambda b: lb(lab, b, action, server, timeout), balancers))
        for balancer, answer in zip(balancers, answers):
            step(f"{balancer}: {answer}")

    return run


def rolling_upgrade(lab: Lab, site_name: str, say: Callable[[str], None] = print) -> dict[str, float]:
    """Every node of a site, one at a time; the seconds each was out of rotation."""
    return {name: upgrade_node(lab, name, say) for name in lab.topology.sites[site_name].nodes}
