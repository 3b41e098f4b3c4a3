"""`make demo`: the whole path in the namespace lab, one checked step at a time.

Every step prints PASS or FAIL with its time and what it saw; the lab is torn down at the
end whatever happened (also on Ctrl-C or SIGTERM). Exit status 0 only if every step passed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kit import netns, wait_until

from .runner import Lab, LabError

COMMANDS_AFTER_FAILURE = 10
MAX_FAILOVER_SECONDS = 3.0
PROBE_TIMEOUT = 3.0


class StepFailed(Exception):
    pass


@dataclass
class Step:
    title: str
    passed: bool
    seconds: float
    detail: str


class Report:
    def __init__(self, say: Callable[[str], None] = print):
        self.steps: list[Step] = []
        self.say = say

    def run(self, title: str, action: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail, passed = action(), True
        except (StepFailed, LabError, OSError, ValueError, KeyError) as exc:
            detail, passed = str(exc), False
        except KeyboardInterrupt:
            self._record(Step(title, False, time.monotonic() - started, "interrupted"))
            raise
        return self._record(Step(title, passed, time.monotonic() - started, detail))

    def _record(self, step: Step) -> bool:
        self.steps.append(step)
        self.say(f"[{'PASS' if step.passed else 'FAIL'}] {step.seconds:6.1f} s  {step.title}")
        for line in step.detail.splitlines():
            self.say(f"                 {line}")
        return step.passed

    def summary(self) -> str:
        passed = sum(s.passed for s in self.steps)
        total = sum(s.seconds for s in self.steps)
        return f"{passed}/{len(self.steps)} steps passed in {total:.1f} s"

    @property
    def all_passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise StepFailed(message)


# -- the checks, shared with tests/lab


def registered(lab: Lab, site_name: str) -> str:
    site = lab.topology.sites[site_name]
    output = lab.register(site_name)
    status, body = lab.operator("GET", "/operator/v1/proxies")
    expect(status == 200, f"GET /operator/v1/proxies answered {status}: {body[:200]!r}")
    proxies = {p["proxy_id"]: p for p in json.loads(body)}
    expect(site.proxy_id in proxies, f"the upstream does not list {site.proxy_id}: {sorted(proxies)}")
    url = proxies[site.proxy_id].get("url")
    expect(url == lab.public_url(site), f"{site.proxy_id} registered with url {url}, expected {lab.public_url(site)}")
    return f"{output}\nupstream lists {site.proxy_id} at {url} (handshake through {site.public_address}:{lab.topology.proxy_port})"


def agents_handshaken(lab: Lab) -> str:
    lab.start_agents()
    agents = lab.wait_for_agents()
    return "\n".join(f"upstream knows {a['instance_id']} as ({a['proxy_id']}, {a['ip']})" for a in agents)


def send_command(lab: Lab, proxy_id: str, agent_ip: str, args: dict) -> dict:
    status, body = lab.operator("POST", "/operator/v1/commands",
                                {"proxy_id": proxy_id, "agent_ip": agent_ip, "command": "echo", "args": args})
    expect(status == 200, f"POST /operator/v1/commands for {proxy_id} {agent_ip} answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    expect(answer.get("agent_status") == 200 and not answer.get("proxy_error"),
           f"the command for {proxy_id} {agent_ip} did not reach the agent: {answer}")
    return answer


def commands_seen(lab: Lab, agent: str) -> list[dict]:
    """The `command` events in an agent's log (one JSON object per line)."""
    events = []
    for line in lab.processes[agent].log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "command":
            events.append(event)
    return events


def command_reaches_only_site_a(lab: Lab) -> str:
    site_a, site_b = lab.topology.sites["site-a"], lab.topology.sites["site-b"]
    agent_a, agent_b = site_a.agents[0], site_b.agents[0]
    ip = lab.topology.hosts[agent_a].address
    before_b = len(commands_seen(lab, agent_b))
    token = secrets.token_hex(4)
    answer = send_command(lab, site_a.proxy_id, ip, {"demo": token})
    agent_body = answer["agent_body"]
    if isinstance(agent_body, str):
        agent_body = json.loads(agent_body)
    expect(agent_body.get("instance_id") == agent_a, f"answered by {agent_body.get('instance_id')}, expected {agent_a}: {agent_body}")
    expect(agent_body.get("result") == {"demo": token}, f"echo came back as {agent_body.get('result')}, sent {{'demo': {token!r}}}")
    try:
        wait_until(lambda: commands_seen(lab, agent_a), 5, f"a command event in {agent_a}'s log")
    except TimeoutError as exc:
        raise StepFailed(str(exc)) from None
    expect(len(commands_seen(lab, agent_b)) == before_b, f"{agent_b} (site-b, also {ip}) saw a command")
    return (f"{site_a.proxy_id} {ip}: echo {token} answered by {agent_a}\n"
            f"{agent_a}'s log: {len(commands_seen(lab, agent_a))} command(s); {agent_b}'s log (site-b, also {ip}): {before_b}")


def active_balancer(lab: Lab, site_name: str) -> str:
    """The balancer that carries the site's traffic: the one holding the site address (a pair), or the only one."""
    site = lab.topology.sites[site_name]
    if len(site.balancers) == 1:
        return site.balancers[0]
    holders = lab.site_address_holders(site_name)
    expect(len(holders) == 1, f"{site.site_address} is on {holders or 'no balancer'}, expected exactly one")
    return holders[0]


def balancer_log(lab: Lab, site_name: str) -> Path:
    return lab.processes[f"{active_balancer(lab, site_name)}/front"].log_path


def served_by(lab: Lab, site_name: str, offset: int = 0) -> list[str]:
    """The node behind each connection the balancer logged from the upstream, after ``offset``."""
    upstream = lab.topology.upstream_address
    with open(balancer_log(lab, site_name), "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    # The upstream's connections: on the control frontend and backend (listen_control), else on the main ones.
    return [m.group(1) for line in lines if line.startswith(f"{upstream}:")
            for m in [re.search(r" agent_proxy(?:_control control_nodes| nodes)/(\S+) ", line)] if m]


def wait_served(lab: Lab, site_name: str, offset: int, count: int, timeout: float = 5) -> list[str]:
    # HAProxy logs a TCP connection when it closes, just after the answer came back.
    def enough() -> list[str] | None:
        seen = served_by(lab, site_name, offset)
        return seen if len(seen) >= count else None

    try:
        return wait_until(enough, timeout, f"{count} connections in the balancer's log")
    except TimeoutError:
        return served_by(lab, site_name, offset)   # the caller says what is missing


def failover(lab: Lab, node: str = "node1", count: int = COMMANDS_AFTER_FAILURE) -> str:
    site = lab.topology.sites[lab.nodes[node].site]
    ip = lab.topology.hosts[site.agents[0]].address
    # First show that the node is in rotation: commands until the balancer sent one to it.
    start = balancer_log(lab, site.name).stat().st_size
    for i in range(3 * len(site.nodes)):
        send_command(lab, site.proxy_id, ip, {"before_failure": i})
        if node in wait_served(lab, site.name, start, i + 1):
            break
    before = served_by(lab, site.name, start)
    expect(node in before, f"the balancer sent none of {len(before)} commands to {node}: {before}")
    killed = lab.stop_node(node)
    expect(not netns.pids(lab.nodes[node].namespace), f"processes left in {lab.nodes[node].namespace}")
    offset = balancer_log(lab, site.name).stat().st_size
    started = time.monotonic()
    for i in range(count):
        send_command(lab, site.proxy_id, ip, {"after_failure": i})
    took = time.monotonic() - started
    after = wait_served(lab, site.name, offset, count)
    expect(len(after) == count and node not in after, f"after the kill the balancer logged {after}")
    spread = ", ".join(f"{n} {after.count(n)}" for n in sorted(set(after)))
    return (f"before: {len(before)} command(s), the last one served by {before[-1]}\n"
            f"killed {node}: {', '.join(killed)} (SIGKILL)\n"
            f"{count}/{count} commands to {site.proxy_id} {ip} answered afterwards in {took:.1f} s ({spread})")


def balancer_failover(lab: Lab, site_name: str = "site-a", process: str = "front",
                      count: int = COMMANDS_AFTER_FAILURE) -> str:
    """Kill the active balancer's HAProxy (``front``) or keepalived: the site address moves, commands still arrive."""
    site = lab.topology.sites[site_name]
    ip = lab.topology.hosts[site.agents[0]].address
    active = active_balancer(lab, site_name)
    send_command(lab, site.proxy_id, ip, {"before_balancer_failure": active})
    proc = lab.processes[f"{active}/{process}"]
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    standby = lab.wait_site_address(site_name, away_from=active, timeout=10)
    moved = time.monotonic() - killed
    expect(moved < MAX_FAILOVER_SECONDS, f"{site.site_address} took {moved:.1f} s to move from {active} to {standby}")
    offset = lab.processes[f"{standby}/front"].log_path.stat().st_size
    started = time.monotonic()
    for i in range(count):
        send_command(lab, site.proxy_id, ip, {"after_balancer_failure": i})
    took = time.monotonic() - started
    served = wait_served(lab, site_name, offset, count)
    expect(len(served) == count, f"{standby}'s log shows {len(served)} of the {count} commands: {served}")
    what = "HAProxy" if process == "front" else process
    return (f"{site.site_address} was on {active}; killed its {what} (pid {proc.pid}, SIGKILL)\n"
            f"{site.site_address} moved to {standby} in {moved:.2f} s (polling `ip -n NS addr`)\n"
            f"{count}/{count} commands to {site.proxy_id} {ip} answered afterwards in {took:.1f} s, all through {standby}")


def gateway_admits_only_upstream(lab: Lab, site_name: str = "site-a") -> str:
    site = lab.topology.sites[site_name]
    port = lab.topology.proxy_port
    outsider = lab.topology.by_role("outsider")[0]
    try:
        took = lab.connect(outsider.name, site.public_address, port, PROBE_TIMEOUT)
    except socket.timeout:
        dropped = f"{outsider.address} -> {site.public_address}:{port}: no answer within {PROBE_TIMEOUT:g} s (dropped)"
    except OSError as exc:
        raise StepFailed(f"{outsider.address} -> {site.public_address}:{port} was refused, not dropped: {exc}") from None
    else:
        raise StepFailed(f"{outsider.address} -> {site.public_address}:{port} connected in {took:.3f} s; the gateway must drop it")
    took = lab.connect(lab.topology.upstream_host, site.public_address, port, PROBE_TIMEOUT)
    return f"{dropped}\n{lab.topology.upstream_address} -> {site.public_address}:{port}: connected in {took * 1000:.1f} ms"


CONTROL_PATH = "/_proxy/v2/features"


def control_apart(lab: Lab, site_name: str) -> str:
    """The upstream's paths are served on the control port only: an agent with a valid
    signature is refused them on the client port and cannot reach the control port; the
    upstream, through the gateway, is served (listen_control, front.control_port)."""
    from agent_proxy import signing

    topo, site = lab.topology, lab.topology.sites[site_name]
    agent = site.agents[0]
    secret = (lab.workdir / "sites" / site.name / "psk").read_text().strip().encode()

    def signed() -> dict[str, str]:
        return {"Authorization": signing.authorization(secret, site.proxy_id, "GET", CONTROL_PATH)}

    status, body = lab.http(agent, site.site_address, topo.proxy_port, "GET", CONTROL_PATH, tls=True, headers=signed())
    expect(status == 404 and b"control listener only" in body,
           f"{agent} -> {site.site_address}:{topo.proxy_port}{CONTROL_PATH}, signed: {status} {body[:200]!r}; expected 404")
    refused = f"{agent} -> {site.site_address}:{topo.proxy_port} (client port): signed {CONTROL_PATH} 404 {json.loads(body)['description']}"
    try:
        status, body = lab.http(agent, site.site_address, topo.control_port, "GET", CONTROL_PATH, tls=True,
                                headers=signed(), timeout=PROBE_TIMEOUT)
    except OSError as exc:
        shut = f"{agent} -> {site.site_address}:{topo.control_port} (control port): no answer ({exc.__class__.__name__})"
    else:
        raise StepFailed(f"{agent} reached the control port {site.site_address}:{topo.control_port}: {status} {body[:200]!r}")
    status, body = lab.http(topo.upstream_host, site.public_address, topo.proxy_port, "GET", CONTROL_PATH, tls=True,
                            headers=signed())
    expect(status == 200, f"upstream -> {site.public_address}:{topo.proxy_port}{CONTROL_PATH}, signed: {status} {body[:200]!r}")
    served = (f"{topo.upstream_address} -> {site.public_address}:{topo.proxy_port} -> {site.site_address}:"
              f"{topo.control_port} (gateway DNAT to the control port): signed {CONTROL_PATH} 200, "
              f"features {', '.join(sorted(json.loads(body)))}")
    return f"{refused}\n{shut}\n{served}"


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


# -- the demo


def run(lab: Lab, say: Callable[[str], None] = print) -> bool:
    report = Report(say)
    topo = lab.topology
    site_a, site_b = topo.sites["site-a"], topo.sites["site-b"]
    node_count = len(lab.topology.by_role("proxy-node"))

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm), signal.SIGINT: signal.getsignal(signal.SIGINT)}
    veths_before = root_veths()
    say(f"agent-proxy namespace lab: {len(topo.hosts)} hosts, work directory {lab.workdir}\n")
    steps = [
        ("build namespaces, links and routes; apply node and gateway firewalls",
         lambda: (lab.build(), f"{len(lab.namespaces)} namespaces ({lab.prefix}*); rules checked with iptables-restore --test, then applied")[1]),
        (f"start the upstream, {node_count} nodes ({topo.workers} workers + HAProxy front each; front.mode "
         f"{', '.join(f'{s.front_mode} on {s.name}' for s in topo.sites.values())}) and the balancer pair",
         lambda: (lab.start_services(), f"{len(lab.processes)} processes, each answering")[1]),
        (f"register {site_a.proxy_id}: the upstream handshakes back through {site_a.public_address}:{topo.proxy_port}",
         lambda: registered(lab, "site-a")),
        (f"register {site_b.proxy_id}: its own gateway, {site_b.public_address}:{topo.proxy_port}",
         lambda: registered(lab, "site-b")),
        ("both agents (each at 10.0.0.2) handshake through their own proxy", lambda: agents_handshaken(lab)),
        (f"a command for {site_a.proxy_id}'s 10.0.0.2 reaches site A's agent and not site B's",
         lambda: command_reaches_only_site_a(lab)),
        ("kill node1 (front and workers): commands keep flowing through node2 and node3", lambda: failover(lab)),
        (f"kill the active balancer's HAProxy: {site_a.site_address} moves to the other one, commands keep flowing",
         lambda: balancer_failover(lab, "site-a")),
        (f"gateway {site_a.public_address}:{topo.proxy_port} drops a stranger, admits the upstream",
         lambda: gateway_admits_only_upstream(lab)),
        (f"control traffic apart: the upstream's paths on port {topo.control_port} only, refused to a signed agent on "
         f"{topo.proxy_port}", lambda: "\n".join(control_apart(lab, name) for name in topo.sites)),
    ]
    try:
        for title, action in steps:
            if not report.run(title, action):
                break
    except KeyboardInterrupt:
        say("interrupted: tearing down")
    finally:
        # The teardown itself is bounded (SIGKILL after 10 s) and must not be cut short.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        report.run("tear down: no namespace, veth or process left", lambda: torn_down(lab, veths_before))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    passed = report.all_passed and len(report.steps) == len(steps) + 1
    say("")
    say(f"{'PASS' if passed else 'FAIL'}: {report.summary()}" + ("" if passed else f"; logs kept in {lab.workdir}/logs"))
    return passed
