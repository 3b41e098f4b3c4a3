"""What the scenario (lab/scenario.py) needs from a running lab, built on one way to reach a host.

Two labs run the one scenario on the one topology (lab/topology.yaml):
- the namespace lab (lab/runner.py): a host is a network namespace on this machine, a
  command runs there with `ip netns exec`, a service is a process the lab started, with
  a log file;
- the Vagrant lab (lab/vagrant.py): a host is a VM, a command runs there over SSH (with
  sudo), a service is a systemd unit that the playbook installed, logging to the journal.

Everything the scenario does to a host goes through ``run`` (a command on that host), so
the probes below (a TCP connect, the upstream's operator API, registration, who holds a
site address) are the same code for both. What differs besides ``run``: where the
agent-proxy command and a node's config live, how a service's log is read, and how a
service is killed or started (the abstract members).
"""

from __future__ import annotations

import json
import socket
import subprocess
from abc import ABC, abstractmethod
from typing import Sequence

from kit import wait_until

from .topology import Site, Topology


class LabError(Exception):
    """Something in the lab did not come up or did not behave; the message names it."""


# Run with the host's Python: a TCP connect that says how long it took, or why it failed
# (exit 3: no answer within the timeout, i.e. dropped; exit 4: refused or unreachable).
CONNECT = """
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
except socket.timeout:
    sys.exit(3)
except OSError as exc:
    print(exc)
    sys.exit(4)
print(time.monotonic() - started)
"""

# One HTTP(S) request from a host: the status on the first line, then the body; the
# request's body on stdin. tls: "plain", "insecure" (certificate not checked: lab probes)
# or the CA file that must have signed the server's certificate. Exit 3: no answer within
# the timeout (dropped); exit 4: the connection failed otherwise (refused, unreachable).
HTTP = """
import http.client, json, ssl, sys
address, port, method, path, tls, timeout, headers = sys.argv[1:8]
data = sys.stdin.buffer.read() or None
if tls == "plain":
    conn = http.client.HTTPConnection(address, int(port), timeout=float(timeout))
else:
    context = ssl._create_unverified_context() if tls == "insecure" else ssl.create_default_context(cafile=tls)
    conn = http.client.HTTPSConnection(address, int(port), timeout=float(timeout), context=context)
try:
    conn.request(method, path, body=data, headers=json.loads(headers))
    answer = conn.getresponse()
    body = answer.read()
except TimeoutError:
    print(f"{address}:{port}: no answer within {timeout} s", file=sys.stderr)
    sys.exit(3)
except OSError as exc:
    print(f"{address}:{port}: {exc.__class__.__name__} {exc}", file=sys.stderr)
    sys.exit(4)
sys.stdout.buffer.write(b"%d\\n" % answer.status + body)
"""


class Hosts(ABC):
    """A lab as the scenario sees it: the topology, the hosts that are up, and ``run`` on each."""

    topology: Topology
    agents_timeout: float = 30   # seconds for every agent to handshake (a VM under TCG needs longer)
    # Whether the nodes serve the upstream on their own control port (listen_control,
    # front.control_port) behind the gateway; a lab that does provides ``site_secret`` for
    # the scenario's check of it.
    control_apart: bool = False

    # -- the host access: the one thing a lab must provide

    @abstractmethod
    def run(self, host: str, argv: Sequence[str], timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` (as root); never raises for a non-zero exit status."""

    # -- where things are on a host, and its services

    @property
    @abstractmethod
    def hosts_up(self) -> set[str]:
        """The topology's hosts that this lab runs (all of them, or a chosen subset)."""

    @abstractmethod
    def python(self, host: str) -> str:
        """A Python 3 on ``host`` for the probes."""

    @abstractmethod
    def agent_proxy(self, host: str) -> str:
        """The agent-proxy command on a proxy node."""

    @abstractmethod
    def node_config(self, host: str) -> str:
        """A proxy node's agent-proxy.yaml."""

    @property
    @abstractmethod
    def upstream_ca_file(self) -> str:
        """The upstream's certificate, on the upstream host."""

    @abstractmethod
    def log_lines(self, service: str) -> list[str]:
        """What a service printed, one line each: ``agent-a``, ``lb1/front``, ``lb1/keepalived``, ``upstream``."""

    @abstractmethod
    def kill(self, service: str) -> str:
        """SIGKILL to a service (``lb1/front``, ``lb1/keepalived``); says what was killed."""

    @abstractmethod
    def stop_node(self, name: str) -> list[str]:
        """Take a proxy node away at once (front and workers killed); returns what was stopped."""

    @abstractmethod
    def start_agents(self) -> None:
        """Start the reference agent on every agent host that is up."""

    # -- what the topology says, for the hosts that are up

    @property
    def upstream_url(self) -> str:
        return f"https://{self.topology.upstream_address}:{self.topology.upstream_port}"

    def public_url(self, site: Site) -> str:
        return f"https://{site.public_address}:{self.topology.proxy_port}"

    def site_hosts(self, site_name: str) -> set[str]:
        """Every host a site's path needs: the upstream, the internet, and the site's own hosts."""
        topo = self.topology
        return ({topo.upstream_host} | {h.name for h in topo.by_role("router")}
                | {h.name for h in topo.hosts.values() if h.site == site_name})

    @property
    def sites_up(self) -> list[Site]:
        """The sites whose whole path is up, in the topology's order."""
        return [s for s in self.topology.sites.values() if self.site_hosts(s.name) <= self.hosts_up]

    # -- probes, the same on every lab

    def connect(self, host: str, address: str, port: int, timeout: float) -> float:
        """Open a TCP connection from ``host``; the seconds it took, socket.timeout when
        nothing answered (dropped), or OSError (refused, unreachable)."""
        result = self.run(host, [self.python(host), "-c", CONNECT, address, str(port), str(timeout)], timeout=timeout + 30)
        if result.returncode == 3:
            raise socket.timeout(f"{host} -> {address}:{port}: no answer within {timeout:g} s")
        if result.returncode != 0:
            raise OSError(f"{host} -> {address}:{port}: {(result.stdout or result.stderr).strip()}")
        return float(result.stdout)

    def http(self, host: str, address: str, port: int, method: str, path: str, tls: bool | str = False,
             timeout: float = 10, headers: dict[str, str] | None = None, body: str = "") -> tuple[int, bytes]:
        """One HTTP(S) request from ``host`` (``tls``: False, True for a certificate not
        checked, or a CA file on the host); socket.timeout when nothing answered in time
        (dropped), OSError when the connection failed otherwise (refused, unreachable)."""
        mode = tls if isinstance(tls, str) else "insecure" if tls else "plain"
        argv = [self.python(host), "-c", HTTP, address, str(port), method, path, mode, str(timeout),
                json.dumps(headers or {})]
        result = self.run(host, argv, timeout=timeout + 30, input=body)
        if result.returncode == 3:
            raise socket.timeout(f"{host} -> {result.stderr.strip()}")
        if result.returncode == 4:
            raise OSError(f"{host} -> {result.stderr.strip()}")
        if result.returncode != 0:
            raise LabError(f"HTTP probe on {host}: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        status, _, answer = result.stdout.partition("\n")
        return int(status), answer.encode()

    def operator(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        """A call to the upstream's operator API, from the upstream host itself (its
        certificate names 127.0.0.1): (status, body)."""
        topo = self.topology
        try:
            return self.http(topo.upstream_host, "127.0.0.1", topo.upstream_port, method, path, tls=self.upstream_ca_file,
                             timeout=timeout, headers={"Content-Type": "application/json"} if body is not None else {},
                             body=json.dumps(body) if body is not None else "")
        except OSError as exc:
            raise OSError(f"{method} {path} on the upstream's operator API: {exc}") from None

    def register(self, site_name: str) -> str:
        """`agent-proxy register` on the site's first node; the upstream handshakes back."""
        site = self.topology.sites[site_name]
        node = site.nodes[0]
        result = self.run(node, [self.agent_proxy(node), "register", "-c", self.node_config(node)], timeout=60)
        if result.returncode != 0:
            raise LabError(f"register {site.proxy_id} from {node} failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
        return result.stdout.strip()

    def site_address_holders(self, site_name: str) -> list[str]:
        """The balancers of a site that have its site address on an interface now."""
        site = self.topology.sites[site_name]
        holders = []
        for name in site.balancers:
            out = self.run(name, ["ip", "-o", "-4", "addr", "show"], timeout=15).stdout
            if any(line.split()[3].split("/")[0] == site.site_address for line in out.splitlines()):
                holders.append(name)
        return holders

    def wait_site_address(self, site_name: str, away_from: str | None = None, timeout: float = 15) -> str:
        """Until exactly one balancer (not ``away_from``) holds the site address; returns its name."""
        site = self.topology.sites[site_name]
        holders: list[str] = []

        def one_holder() -> str | None:
            holders[:] = self.site_address_holders(site_name)
            return holders[0] if len(holders) == 1 and holders[0] != away_from else None

        try:
            return wait_until(one_holder, timeout, f"{site.site_address} on one balancer")
        except TimeoutError:
            logs = "\n".join(f"{n}/keepalived:\n" + "\n".join(self.log_lines(f"{n}/keepalived")[-5:]) for n in site.balancers)
            raise LabError(f"{site.site_address} is on {holders or 'no balancer'} after {timeout:g} s"
                           f"{f', expected it to leave {away_from}' if away_from else ''}\n{logs}") from None

    def wait_for_agents(self, timeout: float | None = None) -> list[dict]:
        """Until the upstream lists every agent of the sites that are up under its site's proxy_id."""
        topo = self.topology
        timeout = timeout or self.agents_timeout
        wanted = {(site.proxy_id, topo.hosts[a].address, a) for site in self.sites_up for a in site.agents}
        seen: set = set()

        def all_listed() -> list[dict] | None:
            status, body = self.operator("GET", "/operator/v1/agents")
            if status != 200:
                return None
            agents = json.loads(body)
            seen.update((a["proxy_id"], a["ip"], a["instance_id"]) for a in agents)
            return agents if wanted <= seen else None

        try:
            return wait_until(all_listed, timeout, "the agents listed by the upstream", interval=0.2)
        except TimeoutError:
            missing = ", ".join(f"{i} ({p} {ip})" for p, ip, i in sorted(wanted - seen))
            raise LabError(f"agents did not handshake with the upstream within {timeout:g} s: {missing}") from None
