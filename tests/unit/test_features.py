"""Feature states computed from reality (Foreman smart-proxy v2): failed with a reason,
the worker still serves, /_proxy/ready says why."""

import falcon.testing
import pytest

from agent_proxy import config as configuration
from agent_proxy.app import create_app
from tests.unit.test_app import SECRET, UPSTREAM, make_config, signed


def v2(client) -> dict:
    result = client.simulate_get("/_proxy/v2/features", remote_addr=UPSTREAM, headers=signed("GET", "/_proxy/v2/features"))
    assert result.status_code == 200
    return result.json


def lenient(**overrides):
    data = {
        "proxy_id": "site-a", "public_url": "https://4.3.2.1:2002",
        "upstream": {"url": "https://127.0.0.1:9", "connect_timeout": 0.5},
        "networks": {"agents": ["10.0.0.0/24"], "upstream": ["8.7.6.5/32"]},
        **overrides,
    }
    return configuration.parse(data, "test", environ={}, lenient=True)


def test_an_empty_agent_port_list_fails_southbound_only(tmp_path):
    client = falcon.testing.TestClient(create_app(lenient(agents={"ports": []}), SECRET))
    found = v2(client)
    assert found["southbound"]["state"] == "failed"
    assert found["southbound"]["reason"] == "agents.ports: at least one agent port is required"
    assert found["northbound"]["state"] == "running"
    assert client.simulate_get("/_proxy/features").json == ["northbound", "registration", "metrics"]
    path = "/_proxy/agents/10.0.0.2/2003/x"
    result = client.simulate_get(path, remote_addr=UPSTREAM, headers=signed("GET", path))
    assert result.status_code == 503 and result.headers["X-Agent-Proxy-Error"] == "feature-failed"
    ready = client.simulate_get("/_proxy/ready")
    assert ready.json["failed"] == {"southbound": "agents.ports: at least one agent port is required"}


def test_an_unreadable_ca_file_fails_northbound_and_ready_says_why(tmp_path):
    missing = tmp_path / "nope.pem"
    client = falcon.testing.TestClient(create_app(lenient(upstream={"url": "https://127.0.0.1:9", "ca_file": str(missing)}), SECRET))
    found = v2(client)
    assert found["northbound"] == {**found["northbound"], "state": "failed", "reason": f"upstream.ca_file: cannot read file {missing}"}
    result = client.simulate_get("/x", remote_addr="10.0.0.2")
    assert result.status_code == 503 and result.headers["X-Agent-Proxy-Error"] == "feature-failed"
    ready = client.simulate_get("/_proxy/ready")
    assert ready.status_code == 503
    assert ready.json["description"] == f"upstream.ca_file: cannot read file {missing}"
    metrics = client.simulate_get("/_proxy/metrics", remote_addr="127.0.0.1").text
    assert 'agent_proxy_feature_failed{feature="northbound"} 1.0' in metrics
    assert 'agent_proxy_feature_failed{feature="southbound"} 0.0' in metrics


def test_check_config_still_refuses_what_a_worker_would_start_with_a_failed_feature(tmp_path):
    with pytest.raises(configuration.ConfigError, match="agents.ports: at least one agent port is required"):
        configuration.parse({"proxy_id": "a", "upstream": {"url": "https://x"}, "agents": {"ports": []}}, "t", environ={})


def test_capabilities_follow_what_is_served():
    found = v2(falcon.testing.TestClient(create_app(
        make_config(agents={"ports": [2003, 2005], "tls": False}, public_url="http://4.3.2.1:2002"), SECRET)))
    caps = found["southbound"]["capabilities"]
    assert "agent-plain-http" in caps and {"agent-port-2003", "agent-port-2005"} <= set(caps)
    assert (found["southbound"]["http_enabled"], found["southbound"]["https_enabled"]) == (True, False)
    assert (found["northbound"]["http_enabled"], found["northbound"]["https_enabled"]) == (False, True)
