"""The namespace lab, step by step: the demo's scenario with assertions, plus the firewalls
seen from the wire and a teardown that leaves nothing behind.

One lab for the module (its own prefix and work directory, so it never meets a lab that
`make lab-up` left running). Tests run in file order: the node-failure test comes late,
the teardown test last.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from lab import demo, scenario
from lab.runner import Lab, LabError
from kit import REPO, netns

pytestmark = pytest.mark.netns

PREFIX = f"aplt{os.getpid() % 100000}-"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    veths = demo.root_veths()
    lab = Lab(workdir=tmp_path_factory.mktemp("lab") / "work", prefix=PREFIX, say=lambda _: None)
    lab.build()
    lab.start_services()
    lab.veths_before = veths
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def topo(lab):
    return lab.topology


def test_every_host_has_its_namespace_and_the_root_namespace_got_no_link(lab, topo):
    existing = set(netns.names())
    assert {lab.ns(h) for h in topo.hosts} <= existing
    assert demo.root_veths() == lab.veths_before


def test_a_second_lab_in_the_same_place_is_refused_and_leaves_the_first_alone(lab):
    with pytest.raises(LabError, match="already recorded"):
        Lab(workdir=lab.workdir, prefix=PREFIX, say=lambda _: None).up()
    assert lab.state_path.exists()
    assert set(lab.namespaces) <= set(netns.names())
    assert all(p.alive() for p in lab.processes.values())


def test_no_route_leads_off_the_machine(lab, topo):
    # Every default route ends at the internet router, which has none: off-lab is unreachable.
    router = topo.by_role("router")[0]
    result = netns.ns_run(lab.ns(router.name), ["ip", "route", "get", "192.0.2.1"], check=False)
    assert result.returncode != 0 and "unreachable" in result.stderr
    with pytest.raises(OSError):
        lab.connect(topo.upstream_host, "192.0.2.1", 80, 2)


def test_site_a_registers_through_its_gateway(lab):
    assert "https://4.3.2.1:2002" in scenario.registered(lab, "site-a")


def test_site_b_registers_through_its_own_gateway(lab):
    assert "https://4.3.3.1:2002" in scenario.registered(lab, "site-b")


def test_both_agents_at_the_same_address_are_told_apart_by_proxy(lab):
    scenario.agents_handshaken(lab)
    status, body = lab.operator("GET", "/operator/v1/agents")
    assert status == 200
    seen = sorted((a["proxy_id"], a["ip"], a["instance_id"]) for a in json.loads(body))
    assert seen == [("site-a", "10.0.0.2", "agent-a"), ("site-b", "10.0.0.2", "agent-b")]


def test_command_for_site_a_reaches_agent_a_and_not_agent_b(lab):
    before_b = len(scenario.commands_seen(lab, "agent-b"))
    answer = scenario.send_command(lab, "site-a", "10.0.0.2", {"probe": "a"})
    assert answer["agent_body"]["instance_id"] == "agent-a"
    assert answer["agent_body"]["result"] == {"probe": "a"}
    assert len(scenario.commands_seen(lab, "agent-b")) == before_b


def test_command_for_site_b_reaches_agent_b(lab):
    answer = scenario.send_command(lab, "site-b", "10.0.0.2", {"probe": "b"})
    assert answer["agent_body"]["instance_id"] == "agent-b"


def test_gateway_drops_a_stranger_and_admits_the_upstream(lab):
    with pytest.raises(socket.timeout):
        lab.connect("outsider", "4.3.2.1", 2002, scenario.PROBE_TIMEOUT)
    assert lab.connect("upstream", "4.3.2.1", 2002, scenario.PROBE_TIMEOUT) < scenario.PROBE_TIMEOUT


@pytest.mark.parametrize("site", ["site-a", "site-b"])
def test_control_paths_only_on_the_control_port_even_signed(lab, site):
    """An agent holding a valid signature is refused the upstream's paths on the client
    port (404) and cannot reach the control port; the upstream is served through its gateway."""
    seen = scenario.control_apart(lab, site)
    assert "(client port): signed /_proxy/v2/features 404" in seen
    assert "(control port): no answer" in seen
    assert "signed /_proxy/v2/features 200" in seen


def test_node_firewall_admits_the_upstream_on_the_control_port_only(lab, topo):
    node = lab.nodes["node-b"]  # site B has no balancer: the gateway forwards to the node itself
    with pytest.raises(socket.timeout):
        lab.connect("agent-b", node.address, topo.control_port, scenario.PROBE_TIMEOUT)
    assert lab.connect("upstream", "4.3.3.1", topo.proxy_port, scenario.PROBE_TIMEOUT) < scenario.PROBE_TIMEOUT
    rules = open(node.firewall_rules).read()
    assert f"-A INPUT -s 8.7.6.5/32 -p tcp -m tcp --dport {topo.control_port} " in rules
    assert f"-A INPUT -s 8.7.6.5/32 -p tcp -m tcp --dport {topo.proxy_port} " not in rules


def test_node_firewall_drops_a_source_it_does_not_list(lab):
    # The site router (10.1.2.254) is neither an agent, a balancer nor the upstream.
    with pytest.raises(socket.timeout):
        lab.connect("router-a", lab.nodes["node2"].address, 2002, scenario.PROBE_TIMEOUT)


def test_node_firewall_admits_the_balancer_and_the_agents(lab):
    node = lab.nodes["node2"]
    assert lab.connect("lb1", node.address, node.front_port, scenario.PROBE_TIMEOUT) < scenario.PROBE_TIMEOUT
    assert lab.connect("agent-a", node.address, node.front_port, scenario.PROBE_TIMEOUT) < scenario.PROBE_TIMEOUT


def test_node_firewall_as_applied_is_the_rendered_file(lab):
    node = lab.nodes["node2"]
    applied = netns.ns_run(node.namespace, ["iptables-save", "-t", "filter"]).stdout
    assert ":INPUT DROP" in applied and ":FORWARD DROP" in applied
    rendered = [l for l in open(node.firewall_rules).read().splitlines() if l.startswith("-A ")]
    assert rendered == [l for l in applied.splitlines() if l.startswith("-A ")]


@pytest.mark.parametrize("name", ["node1", "node-b"])
def test_applied_rules_pass_restore_test(lab, name):
    node = lab.nodes[name]
    for tool, rules in (("iptables-restore", node.firewall_rules), ("ip6tables-restore", node.firewall6_rules)):
        result = netns.ns_run(node.namespace, [tool, "--test", rules], check=False)
        assert result.returncode == 0, result.stderr


def test_losing_a_node_does_not_stop_commands(lab):
    node1 = lab.nodes["node1"]
    pids = dict(node1.pids)
    scenario.failover(lab, "node1", count=5)
    assert not netns.pids(node1.namespace)
    assert not any(lab.processes[f"node1/{key}"].alive() for key in pids)


def test_down_from_the_command_line_leaves_nothing(lab):
    recorded = list(lab.processes.values())
    namespaces = list(lab.namespaces)
    result = subprocess.run([sys.executable, "-m", "lab", "down", "--workdir", str(lab.workdir)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not [n for n in netns.names() if n.startswith(PREFIX)]
    assert not [p.pid for p in recorded if p.alive()]
    assert not set(namespaces) & set(netns.names())
    assert demo.root_veths() == lab.veths_before
    assert not lab.state_path.exists()
    lab.processes, lab.namespaces = {}, []
