"""lab/topology.yaml, read and checked into plain objects.

The file is data for two readers (this lab and the Vagrantfile); this module checks what
the namespace lab relies on and says which entry is wrong, one line per problem.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TOPOLOGY_FILE = Path(__file__).with_name("topology.yaml")
ROLES = {"upstream", "router", "outsider", "gateway", "balancer", "proxy-node", "site-router", "agent"}


class TopologyError(Exception):
    pass


@dataclass(frozen=True)
class Network:
    name: str
    cidr: ipaddress.IPv4Network


@dataclass(frozen=True)
class Interface:
    network: str
    address: ipaddress.IPv4Address
    prefixlen: int

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class Route:
    to: str
    via: str


@dataclass(frozen=True)
class Host:
    name: str
    role: str
    interfaces: tuple[Interface, ...]
    site: str | None = None
    proxy_id: str | None = None
    gateway: str | None = None
    routes: tuple[Route, ...] = ()
    forwarding: bool = False

    @property
    def address(self) -> str:
        """The first interface's address: the one a host is known by."""
        return str(self.interfaces[0].address)


@dataclass(frozen=True)
class Site:
    name: str
    proxy_id: str
    public_address: str
    site_address: str
    service_network: str
    agent_network: str
    gateway: str
    balancers: tuple[str, ...]   # none, one, or several sharing site_address (keepalived)
    nodes: tuple[str, ...]
    agents: tuple[str, ...]
    front_mode: str = "worker"   # the nodes' front.mode: worker or native


@dataclass(frozen=True)
class Topology:
    upstream_host: str
    upstream_address: str
    upstream_port: int
    agent_port: int
    proxy_port: int
    worker_port: int
    workers: int
    control_port: int          # front.control_port: where the upstream's calls go
    control_worker_port: int   # listen_control.port of the first worker
    networks: dict[str, Network]
    hosts: dict[str, Host]
    sites: dict[str, Site] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)   # role -> Ansible group (the Vagrant lab)

    def by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == role]

    def members(self, network: str) -> list[tuple[Host, Interface]]:
        return [(h, i) for h in self.hosts.values() for i in h.interfaces if i.network == network]


def load(path: Path = TOPOLOGY_FILE) -> Topology:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: cannot read: {exc}") from None
    try:
        return _parse(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise TopologyError(f"{path}: {exc}") from None


def _parse(data: dict) -> Topology:
    networks = {}
    for entry in data["networks"]:
        networks[entry["name"]] = Network(entry["name"], ipaddress.IPv4Network(entry["cidr"]))
    hosts: dict[str, Host] = {}
    for entry in data["hosts"]:
        name = entry["name"]
        if entry["role"] not in ROLES:
            raise ValueError(f"host {name}: role {entry['role']!r} is not one of {', '.join(sorted(ROLES))}")
        interfaces = []
        for item in entry["interfaces"]:
            if item["network"] not in networks:
                raise ValueError(f"host {name}: unknown network {item['network']!r}")
            net = networks[item["network"]]
            address = ipaddress.IPv4Address(item["address"])
            if address not in net.cidr:
                raise ValueError(f"host {name}: {address} is not inside {net.name} {net.cidr}")
            interfaces.append(Interface(net.name, address, net.cidr.prefixlen))
        if name in hosts:
            raise ValueError(f"host {name}: defined twice")
        hosts[name] = Host(
            name=name,
            role=entry["role"],
            interfaces=tuple(interfaces),
            site=entry.get("site"),
            proxy_id=entry.get("proxy_id"),
            gateway=entry.get("gateway"),
            routes=tuple(Route(r["to"], r["via"]) for r in entry.get("routes") or ()),
            forwarding=bool(entry.get("forwarding", False)),
        )
    sites = {}
    for entry in data["sites"]:
        site = Site(
            name=entry["name"], proxy_id=entry["proxy_id"], public_address=entry["public_address"],
            site_address=entry["site_address"], service_network=entry["service_network"],
            agent_network=entry["agent_network"], gateway=entry["gateway"], balancers=tuple(entry.get("balancers") or ()),
            nodes=tuple(entry["nodes"]), agents=tuple(entry["agents"]),
            front_mode=entry.get("front_mode", "worker"),
        )
        if site.front_mode not in ("worker", "native"):
            raise ValueError(f"site {site.name}: front_mode must be worker or native, got {site.front_mode!r}")
        for ref in (site.gateway, *site.balancers, *site.nodes, *site.agents):
            if ref not in hosts:
                raise ValueError(f"site {site.name}: unknown host {ref!r}")
        sites[site.name] = site
    groups = {str(role): str(group) for role, group in (data.get("groups") or {}).items()}
    if set(groups) != ROLES:
        raise ValueError(f"groups: needs exactly one group per role; missing {sorted(ROLES - set(groups))}, "
                         f"unknown {sorted(set(groups) - ROLES)}")
    upstream = data["upstream"]
    if upstream["host"] not in hosts:
        raise ValueError(f"upstream: unknown host {upstream['host']!r}")
    return Topology(
        upstream_host=upstream["host"], upstream_address=str(ipaddress.IPv4Address(upstream["address"])),
        upstream_port=int(upstream["port"]), agent_port=int(data["agents"]["port"]),
        proxy_port=int(data["proxy"]["port"]), worker_port=int(data["proxy"]["worker_port"]),
        workers=int(data["proxy"]["workers"]), control_port=int(data["proxy"]["control_port"]),
        control_worker_port=int(data["proxy"]["control_worker_port"]), networks=networks, hosts=hosts, sites=sites,
        groups=groups,
    )
