"""lab/topology.yaml: what the lab and the Vagrantfile read, and the errors for a bad entry."""

from __future__ import annotations

import re

import pytest
import yaml

from lab import topology
from lab.topology import TopologyError


def test_the_topology_holds_the_design_addresses():
    topo = topology.load()
    assert (topo.upstream_address, topo.upstream_port) == ("8.7.6.5", 3302)
    site_a, site_b = topo.sites["site-a"], topo.sites["site-b"]
    assert (site_a.public_address, site_a.site_address) == ("4.3.2.1", "10.1.2.3")
    assert [topo.hosts[b].address for b in site_a.balancers] == ["10.1.2.4", "10.1.2.5"] and len(site_a.nodes) == 3
    assert {topo.hosts[n].proxy_id for n in site_a.nodes} == {"site-a"}
    assert [topo.hosts[n].proxy_id for n in site_b.nodes] == ["site-b"]
    assert {topo.hosts[a].address for s in topo.sites.values() for a in s.agents} == {"10.0.0.2"}
    assert (site_a.front_mode, site_b.front_mode) == ("native", "worker")  # the demo runs both modes


def test_only_the_internet_router_has_no_default_route_and_it_joins_no_outside_network():
    topo = topology.load()
    without_gateway = [h.name for h in topo.hosts.values() if not h.gateway]
    assert sorted(without_gateway) == ["internet", "router-a"]
    assert {i.network for i in topo.hosts["internet"].interfaces} == {"wan-upstream", "wan-a", "wan-b", "wan-outsider"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["hosts"][0]["interfaces"][0].update(address="9.9.9.9"), "host upstream: 9.9.9.9 is not inside wan-upstream"),
    (lambda d: d["hosts"][0].update(role="server"), "host upstream: role 'server' is not one of"),
    (lambda d: d["sites"][0].update(gateway="nowhere"), "site site-a: unknown host 'nowhere'"),
    (lambda d: d["sites"][0].update(front_mode="fast"), "site site-a: front_mode must be worker or native, got 'fast'"),
    (lambda d: d["hosts"][0]["interfaces"][0].update(network="lan"), "host upstream: unknown network 'lan'"),
    (lambda d: d["groups"].pop("agent"), "groups: needs exactly one group per role; missing ['agent'], unknown []"),
])
def test_a_bad_entry_is_named(tmp_path, change, message):
    data = yaml.safe_load(topology.TOPOLOGY_FILE.read_text())
    change(data)
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopologyError, match=re.escape(message)):
        topology.load(path)
