"""Descriptor and connection limits agree end to end: units, node front, worker, config.

Each limit is derived from the config (limits.connection_limit, limits.max_in_flight,
front.max_connections); the units' LimitNOFILE are fixed ceilings, and the config's
bounds keep every derived need under them. Read from the files the image installs.
"""

from __future__ import annotations

import re

import pytest

from agent_proxy import config as configuration
from agent_proxy.server import worker_descriptors
from agent_proxy.render import render
from kit import REPO


def unit_nofile(unit: str) -> int:
    text = (REPO / "appliance" / "systemd" / unit).read_text()
    return int(re.search(r"^LimitNOFILE=(\d+)$", text, re.M).group(1))


def bound(section: type, name: str) -> int:
    """The largest value the config accepts for ``section.name``."""
    check = next(f for f in section.__dataclass_fields__.values() if f.name == name).metadata["check"]
    with pytest.raises(ValueError) as refused:
        check(10**9)
    return int(re.search(r"between \d+ and (\d+)", str(refused.value)).group(1))


def parse(**data) -> configuration.Config:
    return configuration.parse({"proxy_id": "site-a", "upstream": {"url": "https://8.7.6.5:3302"}, **data}, "test", environ={})


def test_the_largest_worker_fits_its_unit():
    largest = parse(
        limits={"connection_limit": bound(configuration.Limits, "connection_limit"),
                "threads": bound(configuration.Limits, "threads")},
        upstream={"url": "https://8.7.6.5:3302", "pool_size": bound(configuration.Upstream, "pool_size")},
    )
    assert worker_descriptors(largest) <= unit_nofile("agent-proxy@.service")


def test_the_largest_front_fits_its_unit():
    largest = parse(front={"max_connections": bound(configuration.Front, "max_connections")})
    global_maxconn = int(re.search(r"^    maxconn (\d+)$", render("node-haproxy", largest), re.M).group(1))
    # HAProxy reserves two descriptors a connection, plus some for listeners and checks.
    assert 2 * global_maxconn + 1024 <= unit_nofile("agent-proxy-front.service")


def test_the_node_front_takes_its_maxconn_from_the_config():
    config = parse(limits={"max_in_flight": 40}, front={"max_connections": 5000})
    text = render("node-haproxy", config)
    global_section = text[text.index("\nglobal"):text.index("\ndefaults")]
    frontend = text[text.index("\nfrontend"):text.index("\nbackend")]
    assert re.search(r"^    maxconn 5064$", global_section, re.M)  # the frontend's plus the stats socket
    assert re.search(r"^    maxconn 5000$", frontend, re.M)
    # An eighth under max_in_flight: the worker still counts the request before, when the
    # front may already send the next.
    assert re.search(r"^    default-server .* maxconn 35 pool-max-conn 40$", text, re.M)
    assert parse(limits={"max_in_flight": 1}).limits.front_per_worker == 1
    assert parse(limits={"max_in_flight": 64}).limits.front_per_worker == 56


def test_a_worker_must_hold_what_the_front_may_send_it():
    # The front keeps max_in_flight busy and as many idle connections per worker, twice during a reload.
    with pytest.raises(configuration.ConfigError, match=r"limits.connection_limit: must be at least 4 x limits.max_in_flight \+ 16 \(416\)"):
        parse(limits={"max_in_flight": 100, "connection_limit": 415})
    assert parse(limits={"max_in_flight": 100, "connection_limit": 416}).limits.connection_limit == 416
