"""The firewall templates: rendered from a config, accepted by iptables-restore --test.

`--test` runs inside a namespace this module creates, so the host's own rules are never
read or touched; applying and probing the rules over real connections is in tests/lab.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from agent_proxy import config as configuration
from agent_proxy.render import render
from kit import AGENT_PROXY, SECRET, netns

NS = f"apt-fw-{os.getpid()}"

CONFIG = {
    "proxy_id": "site-a",
    "upstream": {"url": "https://8.7.6.5:3302"},
    "networks": {"agents": ["10.0.0.0/24", "fd00:a::/64"], "upstream": ["8.7.6.5/32"]},
    "front": {"balancers": ["10.1.2.3/32"]},
}
GATEWAY = {
    "public_address": "4.3.2.1",
    "site_address": "10.1.2.3",
    "egress": [{"source": "10.1.2.0/24", "destination": "8.7.6.5/32", "port": 3302}],
    "admin_networks": ["192.0.2.0/24", "2001:db8::/32"],
}


@pytest.fixture(scope="module")
def scratch_ns():
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    netns.add(NS)
    try:
        yield NS
    finally:
        netns.delete(NS)


@pytest.fixture(scope="module")
def config():
    return configuration.parse(CONFIG, "test", environ={})


def restore_test(ns: str, rules: str, six: bool = False) -> subprocess.CompletedProcess:
    tool = "ip6tables-restore" if six else "iptables-restore"
    return subprocess.run(netns.prefix(ns) + [tool, "--test"], input=rules, capture_output=True, text=True, timeout=30)


def rule_lines(rules: str) -> list[str]:
    return [line for line in rules.splitlines() if line.startswith(("-A", ":"))]


@pytest.mark.parametrize("name, six, variables", [
    ("firewall-node", False, {"admin_networks": ["192.0.2.0/24", "2001:db8::/32"]}),
    ("firewall-node", False, {}),
    ("firewall-node6", True, {"admin_networks": ["192.0.2.0/24", "2001:db8::/32"]}),
    ("firewall-gateway", False, GATEWAY),
    ("firewall-gateway6", True, {"admin_networks": ["2001:db8::/32"]}),
])
def test_rendered_rules_pass_restore_test(scratch_ns, config, name, six, variables):
    rules = render(name, config, variables)
    result = restore_test(scratch_ns, rules, six)
    assert result.returncode == 0, f"{name}:\n{rules}\n{result.stderr}"


@pytest.mark.parametrize("name, six, variables", [
    ("firewall-node", False, {"admin_networks": ["192.0.2.0/24"]}),
    ("firewall-node6", True, {"admin_networks": ["2001:db8::/32"]}),
    ("firewall-gateway", False, GATEWAY),
    ("firewall-gateway6", True, {"admin_networks": ["2001:db8::/32"]}),
])
def test_rules_are_written_as_iptables_save_prints_them(scratch_ns, config, name, six, variables):
    # Applied in the scratch namespace and read back: the same lines, so a rendered file
    # can be compared with what a host runs (`iptables-save`) line for line.
    rules = render(name, config, variables)
    tool = "ip6tables" if six else "iptables"
    subprocess.run(netns.prefix(scratch_ns) + [f"{tool}-restore"], input=rules, text=True, check=True, timeout=30)
    saved = subprocess.run(netns.prefix(scratch_ns) + [f"{tool}-save"], capture_output=True, text=True, check=True, timeout=30).stdout
    assert [l for l in saved.splitlines() if l.startswith("-A")] == [l for l in rules.splitlines() if l.startswith("-A")]


def test_restore_test_rejects_a_bad_source(scratch_ns, config):
    # The check above can fail: a source that is not an address is refused.
    rules = render("firewall-node", config, {"admin_networks": ["not-a-network/99"]})
    assert restore_test(scratch_ns, rules).returncode != 0


def test_node_rules_drop_by_default_and_open_the_front_to_the_configured_sources_only(config):
    lines = rule_lines(render("firewall-node", config, {"admin_networks": ["192.0.2.0/24"]}))
    assert ":INPUT DROP [0:0]" in lines and ":FORWARD DROP [0:0]" in lines
    appended = [line for line in lines if line.startswith("-A INPUT")]
    assert appended[0] == "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    front = sorted(line.split()[3] for line in appended if "--dport 2002" in line)
    assert front == ["10.0.0.0/24", "10.1.2.3/32", "8.7.6.5/32"]
    ssh = [line.split()[3] for line in appended if "--dport 22 " in line]
    assert ssh == ["192.0.2.0/24"]
    assert not any("-s" not in line.split() and "--dport" in line for line in appended)


def test_node_rules_without_admin_networks_have_no_ssh(config):
    assert not any("--dport 22 " in line for line in rule_lines(render("firewall-node", config, {})))


def test_node6_rules_take_only_ipv6_sources(config):
    lines = rule_lines(render("firewall-node6", config, {"admin_networks": ["192.0.2.0/24", "2001:db8::/32"]}))
    sources = [line.split()[3] for line in lines if line.startswith("-A INPUT -s")]
    assert sources == ["fd00:a::/64", "2001:db8::/32"]


def test_gateway_forwards_only_upstream_sources_and_only_what_it_rewrote(config):
    lines = rule_lines(render("firewall-gateway", config, GATEWAY))
    dnat = [line for line in lines if "-j DNAT" in line]
    assert dnat == ["-A PREROUTING -s 8.7.6.5/32 -d 4.3.2.1/32 -p tcp -m tcp --dport 2002 -j DNAT --to-destination 10.1.2.3:2002"]
    forward_new = [line for line in lines if line.startswith("-A FORWARD") and "ESTABLISHED" not in line and "INVALID" not in line]
    assert forward_new == [
        "-A FORWARD -s 8.7.6.5/32 -d 10.1.2.3/32 -p tcp -m tcp --dport 2002 -m conntrack --ctstate DNAT -j ACCEPT",
        "-A FORWARD -s 10.1.2.0/24 -d 8.7.6.5/32 -p tcp -m tcp --dport 3302 -m conntrack --ctstate NEW -j ACCEPT",
    ]
    assert ":FORWARD DROP [0:0]" in lines and ":INPUT DROP [0:0]" in lines


def test_gateway_upstream_sources_variable_overrides_the_config(config):
    lines = rule_lines(render("firewall-gateway", config, {**GATEWAY, "upstream_sources": ["198.51.100.0/24"]}))
    assert [line.split()[3] for line in lines if "-j DNAT" in line] == ["198.51.100.0/24"]


def test_gateway_with_no_upstream_sources_forwards_nothing():
    empty = configuration.parse({**CONFIG, "networks": {"agents": ["10.0.0.0/24"]}}, "test", environ={})
    lines = rule_lines(render("firewall-gateway", empty, {"public_address": "4.3.2.1", "site_address": "10.1.2.3"}))
    assert not any("DNAT" in line for line in lines)


def test_gateway_render_without_public_address_is_a_one_line_error(tmp_path):
    path = tmp_path / "agent-proxy.yaml"
    (tmp_path / "psk").write_text(SECRET)
    path.write_text("proxy_id: site-a\nupstream: {url: 'https://8.7.6.5:3302'}\nnetworks: {upstream: [8.7.6.5/32]}\n")
    result = subprocess.run([AGENT_PROXY, "render", "firewall-gateway", "-c", str(path), "--set", "site_address=10.1.2.3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "public_address" in result.stderr


@pytest.fixture(scope="module")
def control_config():
    return configuration.parse(
        {**CONFIG, "listen_control": {"host": "127.0.0.1", "port": 9002},
         "networks": {"agents": ["10.0.0.0/24", "fd00:a::/64"], "upstream": ["8.7.6.5/32", "2001:db8:5::/48"]}},
        "test", environ={},
    )


def test_with_listen_control_the_upstream_is_admitted_on_the_control_port_only(control_config):
    for name, expected in (("firewall-node", {2002: ["10.0.0.0/24", "10.1.2.3/32"], 2004: ["10.1.2.3/32", "8.7.6.5/32"]}),
                           ("firewall-node6", {2002: ["fd00:a::/64"], 2004: ["2001:db8:5::/48"]})):
        appended = [line for line in rule_lines(render(name, control_config, {})) if line.startswith("-A INPUT -s")]
        by_port = {port: sorted(line.split()[3] for line in appended if f"--dport {port} " in line) for port in (2002, 2004)}
        assert by_port == expected, name


def test_with_listen_control_the_gateway_forwards_to_the_control_port(scratch_ns, control_config):
    rules = render("firewall-gateway", control_config, GATEWAY)
    assert restore_test(scratch_ns, rules).returncode == 0
    dnat = [line for line in rule_lines(rules) if "-j DNAT" in line]
    assert dnat == ["-A PREROUTING -s 8.7.6.5/32 -d 4.3.2.1/32 -p tcp -m tcp --dport 2002 -j DNAT --to-destination 10.1.2.3:2004"]
