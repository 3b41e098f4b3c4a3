"""The lab's scenario: the whole path, one checked step at a time, on any lab (lab/hosts.py).

`make demo` runs it on the namespace lab (lab/demo.py) and `make vagrant-demo` on VMs
(lab/vagrant.py): the same steps and checks, written once here; each lab adds only its
own bring-up and tear-down steps. Every step prints PASS or FAIL with its time and what
it saw, or SKIP when a host it needs is not in the lab (a Vagrant lab of a few hosts,
LAB_HOSTS). The tear-down step runs whatever happened (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable

from kit import wait_until

from .hosts import Hosts, LabError

COMMANDS_AFTER_FAILURE = 10
MAX_FAILOVER_SECONDS = 3.0
PROBE_TIMEOUT = 3.0

Action = Callable[[], str]


class StepFailed(Exception):
    pass


@dataclass
class Step:
    title: str
    passed: bool
    seconds: float
    detail: str
    skipped: bool = False


class Report:
    def __init__(self, say: Callable[[str], None] = print):
        self.steps: list[Step] = []
        self.say = say

    def run(self, title: str, action: Action) -> bool:
        started = time.monotonic()
        try:
            detail, passed = action(), True
        except (StepFailed, LabError, OSError, ValueError, KeyError) as exc:
            detail, passed = str(exc), False
        except KeyboardInterrupt:
            self._record(Step(title, False, time.monotonic() - started, "interrupted"))
            raise
        return self._record(Step(title, passed, time.monotonic() - started, detail))

    def skip(self, title: str, reason: str) -> None:
        self._record(Step(title, True, 0.0, reason, skipped=True))

    def _record(self, step: Step) -> bool:
        self.steps.append(step)
        mark = "SKIP" if step.skipped else "PASS" if step.passed else "FAIL"
        self.say(f"[{mark}] {step.seconds:6.1f} s  {step.title}")
        for line in step.detail.splitlines():
            self.say(f"                 {line}")
        return step.passed

    def summary(self) -> str:
        ran = [s for s in self.steps if not s.skipped]
        passed = sum(s.passed for s in ran)
        total = sum(s.seconds for s in ran)
        skipped = len(self.steps) - len(ran)
        return (f"{passed}/{len(ran)} steps passed in {total:.1f} s"
                + (f", {skipped} skipped (hosts not in the lab)" if skipped else ""))

    @property
    def all_passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise StepFailed(message)


# -- the checks, shared with tests/lab


def registered(lab: Hosts, site_name: str) -> str:
    site = lab.topology.sites[site_name]
    output = lab.register(site_name)
    status, body = lab.operator("GET", "/operator/v1/proxies")
    expect(status == 200, f"GET /operator/v1/proxies answered {status}: {body[:200]!r}")
    proxies = {p["proxy_id"]: p for p in json.loads(body)}
    expect(site.proxy_id in proxies, f"the upstream does not list {site.proxy_id}: {sorted(proxies)}")
    url = proxies[site.proxy_id].get("url")
    expect(url == lab.public_url(site), f"{site.proxy_id} registered with url {url}, expected {lab.public_url(site)}")
    return f"{output}\nupstream lists {site.proxy_id} at {url} (handshake through {site.public_address}:{lab.topology.proxy_port})"


def agents_handshaken(lab: Hosts) -> str:
    lab.start_agents()
    agents = lab.wait_for_agents()
    return "\n".join(f"upstream knows {a['instance_id']} as ({a['proxy_id']}, {a['ip']})" for a in agents)


def send_command(lab: Hosts, proxy_id: str, agent_ip: str, args: dict) -> dict:
    status, body = lab.operator("POST", "/operator/v1/commands",
                                {"proxy_id": proxy_id, "agent_ip": agent_ip, "command": "echo", "args": args})
    expect(status == 200, f"POST /operator/v1/commands for {proxy_id} {agent_ip} answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    expect(answer.get("agent_status") == 200 and not answer.get("proxy_error"),
           f"the command for {proxy_id} {agent_ip} did not reach the agent: {answer}")
    return answer


def commands_seen(lab: Hosts, agent: str) -> list[dict]:
    """The `command` events in an agent's log (one JSON object per line)."""
    events = []
    for line in lab.log_lines(agent):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "command":
            events.append(event)
    return events


def command_reaches_only(lab: Hosts, site_name: str) -> str:
    """A command for the site's agent address reaches that site's agent, and no other site's agent at the same address."""
    site = lab.topology.sites[site_name]
    agent = site.agents[0]
    ip = lab.topology.hosts[agent].address
    others = [s.agents[0] for s in lab.sites_up if s.name != site_name]
    before = {other: len(commands_seen(lab, other)) for other in others}
    token = secrets.token_hex(4)
    answer = send_command(lab, site.proxy_id, ip, {"demo": token})
    agent_body = answer["agent_body"]
    if isinstance(agent_body, str):
        agent_body = json.loads(agent_body)
    expect(agent_body.get("instance_id") == agent, f"answered by {agent_body.get('instance_id')}, expected {agent}: {agent_body}")
    expect(agent_body.get("result") == {"demo": token}, f"echo came back as {agent_body.get('result')}, sent {{'demo': {token!r}}}")
    try:
        wait_until(lambda: commands_seen(lab, agent), 5, f"a command event in {agent}'s log")
    except TimeoutError as exc:
        raise StepFailed(str(exc)) from None
    lines = [f"{site.proxy_id} {ip}: echo {token} answered by {agent}",
             f"{agent}'s log: {len(commands_seen(lab, agent))} command(s)"]
    for other, count in before.items():
        other_site = lab.topology.hosts[other].site
        expect(len(commands_seen(lab, other)) == count, f"{other} ({other_site}, also {ip}) saw a command")
        lines[-1] += f"; {other}'s log ({other_site}, also {ip}): {count}"
    return "\n".join(lines)


def active_balancer(lab: Hosts, site_name: str) -> str:
    """The balancer that carries the site's traffic: the one holding the site address (a pair), or the only one."""
    site = lab.topology.sites[site_name]
    if len(site.balancers) == 1:
        return site.balancers[0]
    holders = lab.site_address_holders(site_name)
    expect(len(holders) == 1, f"{site.site_address} is on {holders or 'no balancer'}, expected exactly one")
    return holders[0]


def served_by(lab: Hosts, balancer: str, offset: int = 0) -> list[str]:
    """The node behind each connection ``balancer`` logged from the upstream, after line ``offset``."""
    upstream = lab.topology.upstream_address
    lines = lab.log_lines(f"{balancer}/front")[offset:]
    # The log line starts with the client address (after a syslog <PRI> in the journal).
    # The upstream's connections: on the control frontend and backend (listen_control), else on the main ones.
    return [m.group(1) for line in lines if re.search(rf"(^|[\s>]){re.escape(upstream)}:\d+\s", line)
            for m in [re.search(r" agent_proxy(?:_control control_nodes| nodes)/(\S+) ", line)] if m]


def log_length(lab: Hosts, balancer: str) -> int:
    return len(lab.log_lines(f"{balancer}/front"))


def wait_served(lab: Hosts, balancer: str, offset: int, count: int, timeout: float = 5) -> list[str]:
    # HAProxy logs a TCP connection when it closes, just after the answer came back.
    def enough() -> list[str] | None:
        seen = served_by(lab, balancer, offset)
        return seen if len(seen) >= count else None

    try:
        return wait_until(enough, timeout, f"{count} connections in the balancer's log")
    except TimeoutError:
        return served_by(lab, balancer, offset)   # the caller says what is missing


def commands_through(lab: Hosts, site_name: str, balancer: str, count: int, label: str) -> tuple[float, list[str]]:
    """Send ``count`` commands to the site's agent; (seconds they took, the nodes ``balancer`` logged for them)."""
    site = lab.topology.sites[site_name]
    offset = log_length(lab, balancer)
    started = time.monotonic()
    for i in range(count):
        send_command(lab, site.proxy_id, lab.topology.hosts[site.agents[0]].address, {label: i})
    took = time.monotonic() - started
    return took, wait_served(lab, balancer, offset, count)


def failover(lab: Hosts, node: str = "node1", count: int = COMMANDS_AFTER_FAILURE) -> str:
    site = lab.topology.sites[lab.topology.hosts[node].site]
    ip = lab.topology.hosts[site.agents[0]].address
    balancer = active_balancer(lab, site.name)
    # First show that the node is in rotation: commands until the balancer sent one to it.
    start = log_length(lab, balancer)
    for i in range(3 * len(site.nodes)):
        send_command(lab, site.proxy_id, ip, {"before_failure": i})
        if node in wait_served(lab, balancer, start, i + 1):
            break
    before = served_by(lab, balancer, start)
    expect(node in before, f"the balancer sent none of {len(before)} commands to {node}: {before}")
    killed = lab.stop_node(node)
    took, after = commands_through(lab, site.name, balancer, count, "after_failure")
    expect(len(after) == count and node not in after, f"after the kill the balancer logged {after}")
    spread = ", ".join(f"{n} {after.count(n)}" for n in sorted(set(after)))
    return (f"before: {len(before)} command(s), the last one served by {before[-1]}\n"
            f"killed {node}: {', '.join(killed)} (SIGKILL)\n"
            f"{count}/{count} commands to {site.proxy_id} {ip} answered afterwards in {took:.1f} s ({spread})")


def balancer_failover(lab: Hosts, site_name: str = "site-a", process: str = "front",
                      count: int = COMMANDS_AFTER_FAILURE) -> str:
    """Kill the active balancer's HAProxy (``front``) or keepalived: the site address moves, commands still arrive."""
    site = lab.topology.sites[site_name]
    ip = lab.topology.hosts[site.agents[0]].address
    active = active_balancer(lab, site_name)
    send_command(lab, site.proxy_id, ip, {"before_balancer_failure": active})
    what_killed = lab.kill(f"{active}/{process}")
    killed = time.monotonic()
    standby = lab.wait_site_address(site_name, away_from=active, timeout=10)
    moved = time.monotonic() - killed
    expect(moved < MAX_FAILOVER_SECONDS, f"{site.site_address} took {moved:.1f} s to move from {active} to {standby}")
    took, served = commands_through(lab, site_name, standby, count, "after_balancer_failure")
    expect(len(served) == count, f"{standby}'s log shows {len(served)} of the {count} commands: {served}")
    what = "HAProxy" if process == "front" else process
    return (f"{site.site_address} was on {active}; killed its {what} ({what_killed}, SIGKILL)\n"
            f"{site.site_address} moved to {standby} in {moved:.2f} s (polling `ip addr` on the balancers)\n"
            f"{count}/{count} commands to {site.proxy_id} {ip} answered afterwards in {took:.1f} s, all through {standby}")


def gateway_admits_only_upstream(lab: Hosts, site_name: str = "site-a") -> str:
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


def control_apart(lab: Hosts, site_name: str) -> str:
    """The upstream's paths are served on the control port only: an agent with a valid
    signature is refused them on the client port and cannot reach the control port; the
    upstream, through the gateway, is served (listen_control, front.control_port)."""
    from agent_proxy import signing

    topo, site = lab.topology, lab.topology.sites[site_name]
    agent = site.agents[0]
    secret = lab.site_secret(site_name)

    def signed() -> dict[str, str]:
        return {"Authorization": signing.authorization(secret, site.proxy_id, "GET", CONTROL_PATH)}

    status, body = lab.http(agent, site.site_address, topo.proxy_port, "GET", CONTROL_PATH, tls=True, headers=signed())
    expect(status == 404 and b"control listener only" in body,
           f"{agent} -> {site.site_address}:{topo.proxy_port}{CONTROL_PATH}, signed: {status} {body[:200]!r}; expected 404")
    refused = f"{agent} -> {site.site_address}:{topo.proxy_port} (client port): signed {CONTROL_PATH} 404 {json.loads(body)['description']}"
    try:
        status, body = lab.http(agent, site.site_address, topo.control_port, "GET", CONTROL_PATH, tls=True,
                                headers=signed(), timeout=PROBE_TIMEOUT)
    except socket.timeout:
        shut = f"{agent} -> {site.site_address}:{topo.control_port} (control port): no answer within {PROBE_TIMEOUT:g} s (dropped)"
    except OSError as exc:
        shut = f"{agent} -> {site.site_address}:{topo.control_port} (control port): no answer ({exc})"
    else:
        raise StepFailed(f"{agent} reached the control port {site.site_address}:{topo.control_port}: {status} {body[:200]!r}")
    status, body = lab.http(topo.upstream_host, site.public_address, topo.proxy_port, "GET", CONTROL_PATH, tls=True,
                            headers=signed())
    expect(status == 200, f"upstream -> {site.public_address}:{topo.proxy_port}{CONTROL_PATH}, signed: {status} {body[:200]!r}")
    served = (f"{topo.upstream_address} -> {site.public_address}:{topo.proxy_port} -> {site.site_address}:"
              f"{topo.control_port} (gateway DNAT to the control port): signed {CONTROL_PATH} 200, "
              f"features {', '.join(sorted(json.loads(body)))}")
    return f"{refused}\n{shut}\n{served}"


# -- the steps


@dataclass
class ScenarioStep:
    title: str
    needs: set[str]        # hosts that must be up; otherwise the step is skipped
    action: Action


def steps(lab: Hosts) -> list[ScenarioStep]:
    """The scenario's steps on the topology; a step whose hosts are not all up is skipped."""
    topo = lab.topology
    site_a, site_b = topo.sites["site-a"], topo.sites["site-b"]
    up = lab.sites_up
    # The command and gateway steps run on site A, or on the first site that is up.
    first = up[0] if up else site_a
    outsider = topo.by_role("outsider")[0].name
    agents = [a for s in up for a in s.agents]
    agents_title = ("both agents (each at 10.0.0.2) handshake through their own proxy" if len(agents) == 2
                    else f"{agents[0]} (at 10.0.0.2) handshakes through its proxy" if len(agents) == 1
                    else f"the agents {', '.join(agents)} handshake through their proxies")
    command_title = (f"a command for {first.proxy_id}'s 10.0.0.2 reaches site {first.name[-1].upper()}'s agent"
                     + "".join(f" and not site {s.name[-1].upper()}'s" for s in up if s is not first))
    chosen = [
        ScenarioStep(f"register {site_a.proxy_id}: the upstream handshakes back through {site_a.public_address}:{topo.proxy_port}",
                     lab.site_hosts(site_a.name), lambda: registered(lab, site_a.name)),
        ScenarioStep(f"register {site_b.proxy_id}: its own gateway, {site_b.public_address}:{topo.proxy_port}",
                     lab.site_hosts(site_b.name), lambda: registered(lab, site_b.name)),
        ScenarioStep(agents_title, lab.site_hosts(first.name), lambda: agents_handshaken(lab)),
        ScenarioStep(command_title, lab.site_hosts(first.name), lambda: command_reaches_only(lab, first.name)),
        ScenarioStep("kill node1 (front and workers): commands keep flowing through node2 and node3",
                     lab.site_hosts(topo.hosts["node1"].site), lambda: failover(lab)),
        ScenarioStep(f"kill the active balancer's HAProxy: {site_a.site_address} moves to the other one, commands keep flowing",
                     lab.site_hosts(site_a.name), lambda: balancer_failover(lab, site_a.name)),
        ScenarioStep(f"gateway {first.public_address}:{topo.proxy_port} drops a stranger, admits the upstream",
                     lab.site_hosts(first.name) | {outsider}, lambda: gateway_admits_only_upstream(lab, first.name)),
    ]
    if lab.control_apart:
        chosen.append(ScenarioStep(
            f"control traffic apart: the upstream's paths on port {topo.control_port} only, refused to a signed agent on "
            f"{topo.proxy_port}", set().union(*(lab.site_hosts(s.name) for s in up)),
            lambda: "\n".join(control_apart(lab, s.name) for s in up)))
    return chosen


def run(lab: Hosts, header: str, bring_up: list[tuple[str, Action]], tear_down: tuple[str, Action],
        say: Callable[[str], None] = print, logs: str = "") -> bool:
    """The lab's ``bring_up`` steps, the scenario's steps, then ``tear_down`` whatever happened.

    Stops at the first failed step; True only if every step passed (skipped ones count as
    passed). ``logs`` says where to look when a step failed.
    """
    report = Report(say)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm), signal.SIGINT: signal.getsignal(signal.SIGINT)}
    say(header + "\n")
    planned = len(bring_up) + len(steps(lab))
    try:
        if all(report.run(title, action) for title, action in bring_up):
            for step in steps(lab):
                missing = step.needs - lab.hosts_up
                if missing:
                    report.skip(step.title, f"needs {', '.join(sorted(missing))}, not in this lab")
                elif not report.run(step.title, step.action):
                    break
    except KeyboardInterrupt:
        say("interrupted: tearing down")
    finally:
        # The teardown itself is bounded and must not be cut short.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        report.run(*tear_down)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    passed = report.all_passed and len(report.steps) == planned + 1
    say("")
    say(f"{'PASS' if passed else 'FAIL'}: {report.summary()}" + ("" if passed or not logs else f"; logs kept in {logs}"))
    return passed
