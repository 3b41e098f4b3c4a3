"""Listening sockets: the front only on front.bind, the workers only on loopback."""

from __future__ import annotations

import ipaddress


def test_AP_NET_01_front_listens_on_bind_only(node, control):
    port, bind = node.config.front.port, node.config.front.bind
    addresses = sorted({address for address, _ in node.listeners(port)})
    assert addresses, f"nothing listens on port {port}"
    expected = {"0.0.0.0", "*"} if bind in ("0.0.0.0", "*") else {bind}
    assert set(addresses) <= expected, f"port {port} listens on {', '.join(addresses)}; front.bind is {bind}"
    control.note(f"{port} on {', '.join(addresses)}")


def test_AP_NET_02_worker_on_loopback_only(node, control, worker_port):
    addresses = sorted({address for address, _ in node.listeners(worker_port)})
    assert addresses, f"nothing listens on port {worker_port}"
    outside = [a for a in addresses if a in ("*", "0.0.0.0", "::") or not ipaddress.ip_address(a).is_loopback]
    assert not outside, f"worker port {worker_port} is reachable off loopback: listens on {', '.join(outside)}"
    assert ipaddress.ip_address(node.config.listen.host).is_loopback, f"listen.host {node.config.listen.host} is not loopback"
    control.note(f"{worker_port} on {', '.join(addresses)}")
