"""The namespace lab: lab/topology.yaml built from network namespaces and real processes.

    lab = Lab()                  # or Lab(workdir=..., prefix=...) for a second lab
    lab.up()                     # namespaces, firewalls, upstream, nodes, balancer, agents
    lab.nodes["node1"].namespace # per-node facts: config path, ports, PIDs (see NodeInfo)
    lab.down()                   # stops exactly the recorded PIDs, deletes exactly its namespaces

Everything the lab writes lives under its work directory; its state file records every
namespace and process as soon as it exists, so `Lab.from_state(workdir).down()` (what
`python -m lab down` does) finds everything even after a crash. Nothing is added to the
root namespace: links are created inside namespaces, and no namespace has a link out.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from kit import AGENT_PROXY, Process, ProcessError, netns, render, wait_for_port, wait_until, write_private

from . import topology
from .hosts import Hosts, LabError
from .topology import Host, Site, Topology

DEFAULT_WORKDIR = Path("/run/agent-proxy-lab")
DEFAULT_PREFIX = "aplab-"
STATE_FILE = "state.json"
MARKER = ".agent-proxy-lab"
LB_MONITOR_PORT = 8404
REQUIRED_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "haproxy", "keepalived", "curl")


@dataclass
class NodeInfo:
    """One proxy node (or the balancer) as the lab built it."""

    name: str
    role: str                  # proxy-node or balancer
    site: str
    proxy_id: str
    namespace: str
    address: str              # its address on the site's service network
    directory: str            # its own folder: config, certificate, secret, rendered files
    config_path: str          # agent-proxy.yaml (for a balancer: the config it was rendered from)
    front_port: int           # HAProxy on this port (node front or balancer)
    worker_ports: list[int]   # agent-proxy workers on 127.0.0.1 (none on a balancer)
    haproxy_config: str
    firewall_rules: str | None = None    # iptables-restore file applied (proxy nodes)
    firewall6_rules: str | None = None
    pids: dict[str, int] = field(default_factory=dict)   # "front", "worker-8002", "keepalived", ...
    keepalived_config: str | None = None   # balancers of a pair


def _say(message: str) -> None:
    print(message, flush=True)


class Lab(Hosts):
    control_apart = True

    def __init__(self, workdir: Path | str = DEFAULT_WORKDIR, prefix: str = DEFAULT_PREFIX,
                 topology_file: Path | str = topology.TOPOLOGY_FILE, say: Callable[[str], None] = _say):
        self.workdir = Path(workdir)
        self.prefix = prefix
        self.topology_file = Path(topology_file)
        self.topology: Topology = topology.load(self.topology_file)
        self.say = say
        self.namespaces: list[str] = []
        self.processes: dict[str, Process] = {}
        self.nodes: dict[str, NodeInfo] = {}
        # True once this object wrote the state file or was loaded from it: only then may
        # down() remove it (a lab refused at preflight must not forget a running one).
        self.owns_state = False

    # -- names and state

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def switch_ns(self, network: str) -> str:
        return f"{self.prefix}sw-{network}"

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    def save(self) -> None:
        state = {
            "prefix": self.prefix,
            "topology_file": str(self.topology_file),
            "namespaces": self.namespaces,
            "processes": {name: p.record() for name, p in self.processes.items()},
            "nodes": {name: asdict(n) for name, n in self.nodes.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    @classmethod
    def from_state(cls, workdir: Path | str = DEFAULT_WORKDIR, say: Callable[[str], None] = _say) -> "Lab":
        path = Path(workdir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab state at {path}: nothing to do (is the lab up? `python -m lab up`)") from None
        lab = cls(workdir, state["prefix"], state["topology_file"], say)
        lab.namespaces = state["namespaces"]
        lab.processes = {name: Process.from_record(p) for name, p in state["processes"].items()}
        lab.nodes = {name: NodeInfo(**n) for name, n in state["nodes"].items()}
        lab.owns_state = True
        return lab

    # -- the whole thing

    def up(self) -> "Lab":
        """Build and start everything, register both proxies, start the agents; tear down on failure."""
        self._preflight()   # outside the try: a refused start must not tear down a lab already there
        try:
            self.build()
            self.say(f"built {len(self.namespaces)} namespaces, firewalls applied")
            self.start_services()
            self.say(f"started the upstream, the nodes and the balancer ({len(self.processes)} processes)")
            for site in self.topology.sites.values():
                self.say(self.register(site.name))
            self.start_agents()
            self.wait_for_agents()
            self.say("both agents handshook through their proxies")
        except BaseException:
            self.down()
            raise
        return self

    def build(self) -> None:
        """Namespaces, links, addresses, routes, files, firewalls; no process yet."""
        self._preflight()
        self._fresh_workdir()
        self.owns_state = True
        self.save()
        self._build_network()
        self._write_files()
        self._apply_firewalls()
        self.save()

    def start_services(self) -> None:
        """The upstream, every node's workers and front, the balancers; each waited for."""
        self._start_upstream()
        for node in self._proxy_nodes():
            self.start_node(node.name)
        for site in self.topology.sites.values():
            for name in site.balancers:
                self.start_balancer(name)
            if len(site.balancers) > 1:
                holder = self.wait_site_address(site.name)
                self.say(f"{site.site_address} is on {holder} (keepalived)")

    # -- preflight

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, iptables in them)")
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)} (run `make deps`)")
        if self.state_path.exists():
            raise LabError(f"a lab is already recorded in {self.state_path}: run `python -m lab down` first")
        leftover = [n for n in netns.names() if n.startswith(self.prefix)]
        if leftover:
            raise LabError(f"namespaces with prefix {self.prefix!r} exist already: {', '.join(leftover)}")

    def _fresh_workdir(self) -> None:
        """An empty work directory; one left by an earlier lab (marked as ours) is cleared."""
        marker = self.workdir / MARKER
        if self.workdir.exists() and any(self.workdir.iterdir()):
            if not marker.exists():
                raise LabError(f"{self.workdir} exists and is not a lab work directory; choose another (--workdir)")
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.write_text("work directory of the agent-proxy namespace lab; `python -m lab down` stops it\n")

    # -- network

    def _add_namespace(self, name: str) -> None:
        self.namespaces.append(name)   # recorded first: a failed add is still cleaned up
        self.save()
        netns.add(name)

    def _build_network(self) -> None:
        topo = self.topology
        for host in topo.hosts.values():
            self._add_namespace(self.ns(host.name))
        ifnames = {(h.name, i.network): _ifname(h, i.network) for h in topo.hosts.values() for i in h.interfaces}
        for network in topo.networks.values():
            members = topo.members(network.name)
            if len(members) == 2:
                (h1, i1), (h2, i2) = members
                netns.link(self.ns(h1.name), ifnames[h1.name, network.name], i1.cidr,
                           self.ns(h2.name), ifnames[h2.name, network.name], i2.cidr)
            elif len(members) > 2:
                switch = self.switch_ns(network.name)
                self._add_namespace(switch)
                netns.bridge(switch, "br0")
                for host, iface in members:
                    netns.attach(switch, "br0", f"to-{host.name}"[:15], self.ns(host.name),
                                 ifnames[host.name, network.name], iface.cidr)
        for host in topo.hosts.values():
            ns = self.ns(host.name)
            if host.forwarding:
                netns.forwarding(ns)
            for route in host.routes:
                netns.route(ns, route.to, route.via)
            if host.gateway:
                netns.route(ns, "default", host.gateway)

    # -- files

    def host_dir(self, host: str) -> Path:
        return self.workdir / host

    def _proxy_nodes(self) -> list[Host]:
        return self.topology.by_role("proxy-node")

    def _write_files(self) -> None:
        topo = self.topology
        from agent_proxy.tlsutil import self_signed

        up_dir = self.host_dir(topo.upstream_host)
        up_dir.mkdir(parents=True, exist_ok=True)
        # 127.0.0.1 too: the operator API is called from inside the upstream's namespace.
        cert, key = self_signed("upstream", [topo.upstream_address, "127.0.0.1"])
        (up_dir / "upstream.crt").write_bytes(cert)
        write_private(up_dir / "upstream.key", key)

        for site in topo.sites.values():
            site_dir = self.workdir / "sites" / site.name
            # What an operator does once per proxy_id; the files then go to every node.
            _check([AGENT_PROXY, "init", "--config-dir", str(site_dir), "--proxy-id", site.proxy_id,
                    "--upstream-url", self.upstream_url, "--public-url", self.public_url(site),
                    "--hostname", site.public_address, "--hostname", site.site_address],
                   f"agent-proxy init for {site.name}")
            for name in site.nodes:
                self._write_node(site, site_dir, topo.hosts[name])
            for name in site.balancers:
                self._write_balancer(site, topo.hosts[name])
        (self.workdir / "proxy-certs.pem").write_bytes(
            b"".join((self.workdir / "sites" / s / "tls" / "proxy.crt").read_bytes() for s in topo.sites))

    def _node_config(self, site: Site, directory: Path, stats_socket: Path) -> dict:
        topo = self.topology
        balancers = [f"{topo.hosts[name].address}/32" for name in site.balancers]
        return {
            "proxy_id": site.proxy_id,
            "public_url": self.public_url(site),
            "upstream": {"url": self.upstream_url, "ca_file": str(self.host_dir(topo.upstream_host) / "upstream.crt"),
                         "connect_timeout": 3, "read_timeout": 15},
            "listen": {"host": "127.0.0.1", "port": topo.worker_port},
            # The upstream's paths on their own listener and front port (the upstream is
            # let in there only: node firewall, gateway, balancer).
            "listen_control": {"host": "127.0.0.1", "port": topo.control_worker_port},
            "tls": {"cert_file": str(directory / "tls" / "proxy.crt"), "key_file": str(directory / "tls" / "proxy.key")},
            "shared_secret_file": str(directory / "psk"),
            "trusted_proxies": ["127.0.0.1"],
            "networks": {"agents": [str(topo.networks[site.agent_network].cidr)],
                         "upstream": [f"{topo.upstream_address}/32"]},
            "agents": {"ports": [topo.agent_port], "tls": True, "verify": False},
            "front": {"bind": "0.0.0.0", "port": topo.proxy_port, "control_port": topo.control_port,
                      "workers": topo.workers, "balancers": balancers, "stats_socket": str(stats_socket), "mode": site.front_mode},
            "logging": {"level": "info", "format": "json"},
        }

    def _write_node(self, site: Site, site_dir: Path, host: Host) -> None:
        directory = self.host_dir(host.name)
        (directory / "tls").mkdir(parents=True, exist_ok=True)
        shutil.copy2(site_dir / "tls" / "proxy.crt", directory / "tls" / "proxy.crt")
        shutil.copy2(site_dir / "tls" / "proxy.key", directory / "tls" / "proxy.key")
        shutil.copy2(site_dir / "psk", directory / "psk")
        config_path = directory / "agent-proxy.yaml"
        config_path.write_text(yaml.safe_dump(self._node_config(site, directory, directory / "haproxy.sock"), sort_keys=False))
        _check([AGENT_PROXY, "check-config", "-c", str(config_path)], f"check-config for {host.name}")
        if site.front_mode == "native":  # the front's signing key, as the role installs it
            write_private(directory / "psk.haproxy-map", self._render("node-haproxy-key", config_path, {}))
        haproxy_cfg = directory / "haproxy.cfg"
        haproxy_cfg.write_text(self._render("node-haproxy", config_path, {"log_format": "raw"}))
        _check(["haproxy", "-c", "-q", "-f", str(haproxy_cfg)], f"haproxy -c for {host.name}")
        rules, rules6 = directory / "firewall.rules", directory / "firewall6.rules"
        rules.write_text(self._render("firewall-node", config_path, {}))
        rules6.write_text(self._render("firewall-node6", config_path, {}))
        topo = self.topology
        self.nodes[host.name] = NodeInfo(
            name=host.name, role="proxy-node", site=site.name, proxy_id=site.proxy_id, namespace=self.ns(host.name),
            address=self._address_on(host, site.service_network), directory=str(directory), config_path=str(config_path),
            front_port=topo.proxy_port, worker_ports=[topo.worker_port + i for i in range(topo.workers)],
            haproxy_config=str(haproxy_cfg), firewall_rules=str(rules), firewall6_rules=str(rules6),
        )

    def _write_balancer(self, site: Site, host: Host) -> None:
        directory = self.host_dir(host.name)
        directory.mkdir(parents=True, exist_ok=True)
        # The balancer is rendered from the site's proxy config (its port and timeouts)
        # plus the node list; it holds no key (TLS passes through to the nodes).
        node_dir = self.host_dir(site.nodes[0])
        config_path = directory / "agent-proxy.yaml"
        config_path.write_text(yaml.safe_dump(self._node_config(site, node_dir, directory / "haproxy.sock"), sort_keys=False))
        nodes = [{"name": n, "address": self._address_on(self.topology.hosts[n], site.service_network)} for n in site.nodes]
        (directory / "nodes.yaml").write_text(yaml.safe_dump({"nodes": nodes, "monitor_port": LB_MONITOR_PORT, "log_format": "raw"}))
        haproxy_cfg = directory / "haproxy.cfg"
        haproxy_cfg.write_text(self._render("lb-haproxy", config_path, vars_file=directory / "nodes.yaml"))
        _check(["haproxy", "-c", "-q", "-f", str(haproxy_cfg)], f"haproxy -c for {host.name}")
        keepalived_conf = None
        if len(site.balancers) > 1:
            keepalived_conf = directory / "keepalived.conf"
            keepalived_conf.write_text(self._render("keepalived", config_path, self.keepalived_variables(site, host)))
            _check_keepalived(keepalived_conf, host.name)
        self.nodes[host.name] = NodeInfo(
            name=host.name, role="balancer", site=site.name, proxy_id=site.proxy_id, namespace=self.ns(host.name),
            address=self._address_on(host, site.service_network), directory=str(directory), config_path=str(config_path),
            front_port=self.topology.proxy_port, worker_ports=[], haproxy_config=str(haproxy_cfg),
            keepalived_config=str(keepalived_conf) if keepalived_conf else None,
        )

    def keepalived_variables(self, site: Site, host: Host) -> dict:
        """The pair's keepalived settings for ``host``: the first balancer listed starts with the address."""
        network = self.topology.networks[site.service_network]
        index = site.balancers.index(host.name)
        return {
            "interface": _ifname(host, site.service_network),
            "virtual_address": f"{site.site_address}/{network.cidr.prefixlen}",
            "priority": 150 - 10 * index,
            "source_address": self._address_on(host, site.service_network),
            "peers": [self._address_on(self.topology.hosts[n], site.service_network) for n in site.balancers if n != host.name],
            "monitor_port": LB_MONITOR_PORT,
        }

    def _address_on(self, host: Host, network: str) -> str:
        return next(str(i.address) for i in host.interfaces if i.network == network)

    def _render(self, template: str, config_path: Path, variables: dict | None = None, vars_file: Path | None = None) -> str:
        """kit.render with ``variables`` (as JSON, which YAML reads) and ``vars_file``; its failure is the lab's error."""
        items = [f"{key}={json.dumps(value)}" for key, value in (variables or {}).items()]
        try:
            return render(template, config_path, *items, *([str(vars_file)] if vars_file else []))
        except ProcessError as exc:
            raise LabError(f"{exc} (config {config_path})") from None

    # -- firewalls

    def gateway_variables(self, site: Site) -> dict:
        topo = self.topology
        return {
            "public_address": site.public_address,
            "site_address": site.site_address,
            "upstream_sources": [f"{topo.upstream_address}/32"],
            "egress": [{"source": str(topo.networks[site.service_network].cidr),
                        "destination": f"{topo.upstream_address}/32", "port": topo.upstream_port}],
        }

    def _apply_firewalls(self) -> None:
        for node in self.nodes.values():
            if node.role == "proxy-node":
                self.apply_rules(node.namespace, Path(node.firewall_rules))
                self.apply_rules(node.namespace, Path(node.firewall6_rules), six=True)
        for site in self.topology.sites.values():
            directory = self.host_dir(site.gateway)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "gateway.yaml").write_text(yaml.safe_dump(self.gateway_variables(site)))
            config_path = self.nodes[site.nodes[0]].config_path
            rules, rules6 = directory / "gateway.rules", directory / "gateway6.rules"
            rules.write_text(self._render("firewall-gateway", Path(config_path), vars_file=directory / "gateway.yaml"))
            rules6.write_text(self._render("firewall-gateway6", Path(config_path)))
            self.apply_rules(self.ns(site.gateway), rules)
            self.apply_rules(self.ns(site.gateway), rules6, six=True)

    @staticmethod
    def apply_rules(namespace: str, rules: Path, six: bool = False) -> None:
        """Check the file with `--test`, then apply it in one step, inside ``namespace``."""
        tool = "ip6tables-restore" if six else "iptables-restore"
        for argv in ([tool, "--test", str(rules)], [tool, str(rules)]):
            result = netns.ns_run(namespace, argv, check=False)
            if result.returncode != 0:
                raise LabError(f"{' '.join(argv)} in {namespace} failed: {result.stderr.strip()}")

    # -- processes

    def spawn(self, name: str, host: str, argv: list[str]) -> Process:
        log = self.workdir / "logs" / f"{name.replace('/', '-')}.log"
        try:
            proc = Process(name, argv, log, netns=self.ns(host)).start()
        except ProcessError as exc:
            raise LabError(str(exc)) from None
        self.processes[name] = proc
        self.save()
        return proc

    def _start_upstream(self) -> None:
        topo = self.topology
        up_dir = self.host_dir(topo.upstream_host)
        argv = [sys.executable, "-m", "agent_proxy.reference.upstream",
                "--listen", f"0.0.0.0:{topo.upstream_port}",
                "--cert", str(up_dir / "upstream.crt"), "--key", str(up_dir / "upstream.key"),
                "--proxy-ca", str(self.workdir / "proxy-certs.pem")]
        for site in topo.sites.values():
            argv += ["--proxy", f"{site.proxy_id}={self.workdir / 'sites' / site.name / 'psk'}"]
        proc = self.spawn("upstream", topo.upstream_host, argv)
        self.wait_port(topo.upstream_host, topo.upstream_address, topo.upstream_port, "the reference upstream", proc)

    def start_node(self, name: str) -> None:
        """A node's workers, then its front; returns once the front passes a request to a worker."""
        node = self.nodes[name]
        host = self.topology.hosts[name]
        for port in node.worker_ports:
            proc = self.spawn(f"{name}/worker-{port}", name, [AGENT_PROXY, "serve", "-c", node.config_path, "--port", str(port)])
            node.pids[f"worker-{port}"] = proc.pid
        for port in node.worker_ports:
            self.wait_port(host.name, "127.0.0.1", port, f"{name}'s worker", self.processes[f"{name}/worker-{port}"])
        proc = self.spawn(f"{name}/front", name, ["haproxy", "-W", "-db", "-f", node.haproxy_config])
        node.pids["front"] = proc.pid
        self.save()
        self.wait_port(host.name, node.address, node.front_port, f"{name}'s front (HAProxy)", proc)
        self.wait_http(host.name, node.address, node.front_port, "/_proxy/health", f"{name}'s front to its workers", tls=True)

    def start_balancer(self, name: str) -> None:
        """A balancer's HAProxy, ready when its own health says a node is up; then its keepalived (a pair).

        Starts only what is not running, so it also brings back a balancer that lost one of them.
        """
        node = self.nodes[name]
        if not self._running(f"{name}/front"):
            proc = self.spawn(f"{name}/front", name, ["haproxy", "-W", "-db", "-f", node.haproxy_config])
            node.pids["front"] = proc.pid
            self.save()
            self.wait_port(name, node.address, node.front_port, f"{name} (HAProxy balancer)", proc)
            self.wait_http(name, node.address, LB_MONITOR_PORT, "/_lb/health", f"{name}'s health (a node up)")
        if node.keepalived_config and not self._running(f"{name}/keepalived"):
            # Foreground (-n), log to stdout (-l -D), VRRP only (-P), pid files of its own.
            run = Path(node.directory)
            proc = self.spawn(f"{name}/keepalived", name, [
                "keepalived", "-n", "-l", "-D", "-P", "-f", node.keepalived_config,
                "-p", str(run / "keepalived.pid"), "-r", str(run / "keepalived-vrrp.pid")])
            node.pids["keepalived"] = proc.pid
            self.save()

    def _running(self, process: str) -> bool:
        return process in self.processes and self.processes[process].alive()

    def start_agents(self) -> None:
        topo = self.topology
        for site in topo.sites.values():
            for name in site.agents:
                host = topo.hosts[name]
                state = self.host_dir(name)
                state.mkdir(parents=True, exist_ok=True)
                argv = [sys.executable, "-m", "agent_proxy.reference.agent",
                        "--endpoint", f"https://{site.site_address}:{topo.proxy_port}",
                        "--listen", f"{host.address}:{topo.agent_port}", "--instance-id", name,
                        "--checkin-interval", "5", "--max-backoff", "2",
                        "--ca-file", str(self.workdir / "sites" / site.name / "tls" / "proxy.crt"),
                        "--state-file", str(state / "agent-state.json")]
                self.spawn(name, name, argv)
        for site in topo.sites.values():
            for name in site.agents:
                host = topo.hosts[name]
                self.wait_port(name, host.address, topo.agent_port, f"agent {name}", self.processes[name])

    # -- the host access (lab/hosts.py): a host is a namespace, a service a recorded process

    def run(self, host: str, argv, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(netns.prefix(self.ns(host)) + list(argv), capture_output=True, text=True,
                              timeout=timeout, input=input)

    @property
    def hosts_up(self) -> set[str]:
        return set(self.topology.hosts)

    def python(self, host: str) -> str:
        return sys.executable

    def agent_proxy(self, host: str) -> str:
        return AGENT_PROXY

    def node_config(self, host: str) -> str:
        return self.nodes[host].config_path

    @property
    def upstream_ca_file(self) -> str:
        return str(self.host_dir(self.topology.upstream_host) / "upstream.crt")

    def log_lines(self, service: str) -> list[str]:
        return self.processes[service].log_path.read_text(errors="replace").splitlines()

    def kill(self, service: str) -> str:
        proc = self.processes[service]
        proc.signal(signal.SIGKILL)
        return f"pid {proc.pid}"

    # -- talking to things inside the lab

    def wait_port(self, host: str, address: str, port: int, what: str, proc: Process | None = None, timeout: float = 20) -> None:
        try:
            wait_for_port(address, port, timeout, netns=self.ns(host), proc=proc)
        except (TimeoutError, ProcessError) as exc:
            raise LabError(f"{what}: {exc}") from None

    def wait_http(self, host: str, address: str, port: int, path: str, what: str, tls: bool = False, timeout: float = 20) -> None:
        last = "no answer"

        def answers_200() -> bool:
            nonlocal last
            try:
                status, body = self.http(host, address, port, "GET", path, tls=tls, timeout=2)
            except OSError as exc:
                last = str(exc)
                return False
            last = f"{status} {body[:200]!r}"
            return status == 200

        try:
            wait_until(answers_200, timeout, f"GET {path}", interval=0.1)
        except TimeoutError:
            raise LabError(f"{what}: GET {path} on {address}:{port} in {self.ns(host)} did not answer 200 within {timeout:g} s (last: {last})") from None

    def site_secret(self, site_name: str) -> bytes:
        """The site's shared secret (one per proxy_id, copied to each of its nodes)."""
        return (self.workdir / "sites" / site_name / "psk").read_text().strip().encode()

    def http(self, host: str, address: str, port: int, method: str, path: str, tls: bool | str = False,
             timeout: float = 10, headers: dict[str, str] | None = None, body: str = "") -> tuple[int, bytes]:
        """As Hosts.http, run in this process inside ``host``'s namespace (cheap enough to poll)."""

        def call():
            if tls:
                context = ssl.create_default_context(cafile=tls) if isinstance(tls, str) else ssl._create_unverified_context()
                conn = http.client.HTTPSConnection(address, port, timeout=timeout, context=context)
            else:
                conn = http.client.HTTPConnection(address, port, timeout=timeout)
            try:
                conn.request(method, path, body=body or None, headers=headers or {})
                answer = conn.getresponse()
                return answer.status, answer.read()
            finally:
                conn.close()

        return netns.call_in(self.ns(host), call, timeout=timeout + 5)

    # -- stopping

    def stop_node(self, name: str, signum: int = signal.SIGKILL) -> list[str]:
        """Take a node away: its front and workers get ``signum`` (default: killed outright)."""
        node = self.nodes[name]
        stopped = []
        for key in sorted(node.pids, key=lambda k: k != "front"):
            proc = self.processes[f"{name}/{key}"]
            proc.signal(signum)
            stopped.append(f"{key} pid {proc.pid}")
        # HAProxy's own worker processes go when their master goes; wait for the namespace to be empty.
        try:
            wait_until(lambda: not any(self.processes[f"{name}/{k}"].alive() for k in node.pids)
                       and not netns.pids(node.namespace), 10, f"{name} stopped")
        except TimeoutError:
            raise LabError(f"{name}: processes still running 10 s after signal {signum}: {netns.pids(node.namespace)}") from None
        for key in node.pids:
            self.processes[f"{name}/{key}"].stop()  # reaps
        return stopped

    def down(self, timeout: float = 10) -> list[str]:
        """Stop every recorded process (SIGTERM, SIGKILL after ``timeout``), delete every recorded namespace."""
        report = []
        for name, proc in reversed(list(self.processes.items())):
            try:
                proc.stop(timeout)
            except ProcessError as exc:
                report.append(f"{name} (pid {proc.pid}): {exc}")
                continue
            if proc.stopped not in ("stopped", "already gone"):
                report.append(f"{name} (pid {proc.pid}): {proc.stopped}")
        for ns in reversed(self.namespaces):
            strays = netns.pids(ns) if netns.exists(ns) else []
            if strays:
                report.append(f"{ns}: processes the lab did not start are still inside: {strays} (not touched)")
            netns.delete(ns)
        left = [p for p in self.processes.values() if p.alive()]
        if not left and self.owns_state and self.state_path.exists():
            self.state_path.unlink()
        self.processes, self.namespaces = {}, []
        return report

    def status(self) -> list[str]:
        lines = []
        existing = set(netns.names())
        for ns in self.namespaces:
            lines.append(f"namespace {ns}: {'present' if ns in existing else 'MISSING'}")
        for name, proc in self.processes.items():
            lines.append(f"{name:22} pid {proc.pid:<7} {'running' if proc.alive() else 'NOT RUNNING'}  log {proc.log_path}")
        return lines


def _ifname(host: Host, network: str) -> str:
    """The interface name a host has on a network: eth0, eth1, ... in the order of its entries."""
    return f"eth{[i.network for i in host.interfaces].index(network)}"


def _check_keepalived(path: Path, host: str) -> None:
    # keepalived 2.2's config test (-t) ends with SIGTERM whatever it finds; what it
    # prints are the problems, so the file is good when it prints nothing.
    result = subprocess.run(["keepalived", "-t", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if (result.stdout + result.stderr).strip():
        raise LabError(f"keepalived -t -f {path} for {host}: {(result.stdout + result.stderr).strip()}")


def _check(argv: list[str], what: str, timeout: float = 60) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise LabError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}")
    return result.stdout
