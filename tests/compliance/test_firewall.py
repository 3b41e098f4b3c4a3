"""Firewall: INPUT drops by default (IPv4 and IPv6); the front port is open only to the
configured sources (networks.agents, front.balancers, networks.upstream; with
listen_control the upstream on front.control_port only); the rules come back after a
reboot."""

from __future__ import annotations

import ipaddress

import pytest

from tests.compliance.node import FIREWALL_RULES, FIREWALL_UNIT


def test_AP_FW_01_input_policy_drop(node, control):
    policy = node.filter_table(4).policy("INPUT")
    assert policy == "DROP", f"iptables INPUT policy is {policy}"
    control.note("INPUT policy DROP")


def _admits_exactly(node, control, port: int, expected: set) -> None:
    admitted = node.filter_table(4).sources_admitted(port)
    assert "anywhere" not in admitted, f"iptables admits new connections to {port} from anywhere"
    found = {ipaddress.ip_network(s, strict=False) for s in admitted}
    extra, missing = found - expected, expected - found
    assert not extra, f"{port} is open to sources not in the config: {', '.join(map(str, sorted(extra)))}"
    assert not missing, f"{port} is closed to configured sources: {', '.join(map(str, sorted(missing)))}"
    control.note(f"{port} from {', '.join(map(str, sorted(found))) or 'nowhere'}")


def test_AP_FW_02_front_port_only_from_configured_sources(node, control):
    _admits_exactly(node, control, node.config.front.port, node.front_sources)


def test_AP_FW_05_control_port_only_from_the_upstream_and_balancers(node, control):
    """With listen_control, the upstream's own port; without it, that port admits nobody."""
    _admits_exactly(node, control, node.config.front.control_port, node.control_sources)


def test_AP_FW_03_input_policy_drop_ipv6(node, control):
    policy = node.filter_table(6).policy("INPUT")
    assert policy == "DROP", f"ip6tables INPUT policy is {policy}"
    control.note("INPUT policy DROP")


def test_AP_FW_04_rules_persistent(host, node, control):
    if node.namespace_node:
        pytest.skip("a network-namespace lab node has no boot: persistence does not apply")
    if not node.systemd:
        pytest.skip("systemd is not PID 1: the boot-time service cannot be checked")
    if host.service(FIREWALL_UNIT).is_enabled:
        assert host.file(FIREWALL_RULES).is_file, f"{FIREWALL_UNIT} is enabled but {FIREWALL_RULES} is missing"
        control.note(f"{FIREWALL_UNIT} enabled, applies {FIREWALL_RULES}")
        return
    persistent = host.service("netfilter-persistent.service").is_enabled
    rules = host.file("/etc/iptables/rules.v4")
    assert persistent and rules.is_file, \
        f"neither {FIREWALL_UNIT} nor netfilter-persistent with /etc/iptables/rules.v4 is enabled"
    control.note("netfilter-persistent enabled with /etc/iptables/rules.v4")
