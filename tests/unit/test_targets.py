"""Southbound targets: the proxy is never an open proxy, whatever the config says."""

import pytest

from agent_proxy import config as configuration, targets
from agent_proxy.errors import ProxyError

CONFIG = configuration.parse(
    {
        "proxy_id": "site-a",
        "upstream": {"url": "https://8.7.6.5:3302"},
        # A reckless config: it must not open loopback, link-local or anything else.
        "networks": {"agents": ["10.0.0.0/24", "0.0.0.0/0", "::/0"]},
        "agents": {"ports": [2003, 80]},
    },
    "test",
    environ={},
)
NARROW = configuration.parse(
    {"proxy_id": "site-a", "upstream": {"url": "https://8.7.6.5:3302"}, "networks": {"agents": ["10.0.0.0/24"]}},
    "test",
    environ={},
)


def test_literal_agent_ip_is_accepted_with_path_and_query_raw():
    target = targets.parse("/_proxy/agents/10.0.0.2/2003/agent/v1/commands?x=%2F1", NARROW)
    assert (target.ip, target.port, target.path_and_query) == ("10.0.0.2", 2003, "/agent/v1/commands?x=%2F1")
    assert targets.parse("/_proxy/agents/10.0.0.2/2003", NARROW).path_and_query == "/"


@pytest.mark.parametrize("path", ["/cmd%2Fz", "/a%5Cb", "/v1/..x/x..", "/a/.hidden", "/%2e%2e%2e", "/a;b=c/d",
                                  "/..x;y", "/%25", "/%2541"])
def test_an_agent_path_without_dot_segments_passes_as_sent(path):
    assert targets.parse(f"/_proxy/agents/10.0.0.2/2003{path}", NARROW).path_and_query == path


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "127.1.2.3", "::1", "169.254.169.254", "fe80::1", "224.0.0.1", "ff02::1",
     "0.0.0.0", "::", "255.255.255.255", "::ffff:10.0.0.2", "::ffff:127.0.0.1", "2002:7f00:1::1"],
)
def test_never_allowed_classes_are_forbidden(ip):
    with pytest.raises(ProxyError) as info:
        targets.parse(f"/_proxy/agents/{ip}/2003/x", CONFIG)
    assert (info.value.status, info.value.code) == (403, "target-forbidden")


@pytest.mark.parametrize(
    "ip",
    ["localhost", "agent.example", "010.0.0.2", "0xa.0.0.2", "167772162", "10.2", "10.0.0.02",
     "0x0a000002", "10.0.0.2.", "[10.0.0.2]", "%31%30.0.0.2", "FD00::2", "fd00:0:0:0:0:0:0:2"],
)
def test_names_and_odd_encodings_are_bad_targets(ip):
    with pytest.raises(ProxyError) as info:
        targets.parse(f"/_proxy/agents/{ip}/2003/x", CONFIG)
    assert (info.value.status, info.value.code) == (400, "bad-target")


@pytest.mark.parametrize(
    "raw, status, code",
    [
        ("/_proxy/agents/10.0.1.2/2003/x", 403, "target-not-allowed"),
        ("/_proxy/agents/10.0.0.2/22/x", 403, "target-not-allowed"),
        ("/_proxy/agents/10.0.0.255/2003/x", 403, "target-forbidden"),
        ("/_proxy/agents/10.0.0.0/2003/x", 403, "target-forbidden"),
        ("/_proxy/agents/10.0.0.2/02003/x", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/x/y", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/../../etc", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/%2e%2e/x", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/%2E./x", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a%2f..%2fb", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/./x", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/..%2Fetc", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/%2F..", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a%5C..%5Cb", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/.%2e/b", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a/b%00", 400, "bad-target"),
        # what servlet containers, double decoders and lenient UTF-8 decoders read as dot segments
        ("/_proxy/agents/10.0.0.2/2003/..;/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/.;/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/..;jsessionid=1/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/..%3b/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/%2e%2e%3B/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/%252e%252e/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/%25252e%25252e/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a%252f..%252fb", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/%c0%ae%c0%ae/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/%e0%80%ae%e0%80%ae/secret", 400, "bad-target"),
        ("/_proxy/agents/10.0.0.2/2003/a%2500", 400, "bad-target"),
    ],
)
def test_targets_outside_the_rules(raw, status, code):
    with pytest.raises(ProxyError) as info:
        targets.parse(raw, NARROW)
    assert (info.value.status, info.value.code) == (status, code)
