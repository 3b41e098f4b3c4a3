"""The reference control plane's app, without a server.

Its calls to a proxy go to the real worker app (``agent_proxy.app.create_app``) through
falcon.testing, so registration runs the worker's real handshake. Commands go through a
stand-in for the proxy's southbound relay that checks the upstream's Authorization as the
worker does and hands the request to the real reference agent app; the whole path over
the network is in tests/integration/test_two_networks.py.
"""

from __future__ import annotations

import json
import time

import falcon.testing
import pytest

from agent_proxy import config as configuration, signing
from agent_proxy.app import create_app as create_worker
from agent_proxy.reference import agent, upstream
from agent_proxy.reference.common import Answer, call
from kit import free_port

SECRET_A = b"secret-of-site-a-0123456789"
SECRET_B = b"secret-of-site-b-0123456789"
PROXY_URL = "http://proxy.test:2002"


def worker_app(proxy_id: str, secret: bytes):
    config = configuration.parse({
        "proxy_id": proxy_id,
        "public_url": PROXY_URL,
        "upstream": {"url": "https://127.0.0.1:3302"},
        "networks": {"agents": ["10.0.0.0/24"], "upstream": ["127.0.0.0/8"]},
    }, "test", environ={})
    return create_worker(config, secret)


def caller_into(wsgi_app):
    """An upstream ``caller`` that delivers its requests to a WSGI app instead of the network."""
    client = falcon.testing.TestClient(wsgi_app)

    def caller(url, method, path, body=b"", headers=None, context=None, timeout=10):
        result = client.simulate_request(method, path, body=body, headers=headers, remote_addr="127.0.0.1")
        return Answer(result.status_code, {k.lower(): v for k, v in result.headers.items()}, result.content)

    return caller


def signed(secret: bytes, proxy_id: str, method: str, path: str, client_ip: str = "", ts: int | None = None) -> dict:
    headers = {
        "X-Agent-Proxy-Id": proxy_id,
        "X-Agent-Proxy-Signature": signing.signature_header(secret, proxy_id, method, path, client_ip, ts=ts),
    }
    if client_ip:
        headers["X-Agent-Proxy-Client-IP"] = client_ip
    return headers


def make_upstream(caller, allow_token_override: bool = False):
    settings = upstream.Settings(
        secrets={"site-a": SECRET_A, "site-b": SECRET_B}, allow_token_override=allow_token_override,
    )
    registry = upstream.Registry()
    return falcon.testing.TestClient(upstream.create_app(settings, registry, caller)), registry


def register(client, proxy_id="site-a", secret=SECRET_A, url=PROXY_URL):
    path = "/api/v1/agent-proxies"
    return client.simulate_post(path, json={"proxy_id": proxy_id, "url": url, "version": "1"},
                                headers=signed(secret, proxy_id, "POST", path))


# -- registration


def test_registration_handshakes_with_the_real_worker_and_is_idempotent():
    client, _ = make_upstream(caller_into(worker_app("site-a", SECRET_A)))
    first = register(client)
    assert first.status_code == 201, first.text
    assert first.json["features"] == ["northbound", "southbound", "registration", "metrics"]
    again = register(client)
    assert again.status_code == 200
    proxies = client.simulate_get("/operator/v1/proxies").json
    assert [(p["proxy_id"], p["url"]) for p in proxies] == [("site-a", PROXY_URL)]


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing X-Agent-Proxy-Id"),
    (signed(b"not-the-secret-of-site-a", "site-a", "POST", "/api/v1/agent-proxies"), "signature does not match"),
    (signed(SECRET_A, "site-z", "POST", "/api/v1/agent-proxies"), "unknown proxy_id 'site-z'"),
    (signed(SECRET_A, "site-a", "POST", "/api/v1/agent-proxies", ts=int(time.time()) - 3600), "s old (allowed: 300 s either way)"),
    (signed(SECRET_A, "site-a", "POST", "/api/v1/other"), "signature does not match"),
])
def test_registration_with_a_bad_signature_is_401(headers, reason):
    client, registry = make_upstream(caller_into(worker_app("site-a", SECRET_A)))
    result = client.simulate_post("/api/v1/agent-proxies", json={"proxy_id": "site-a", "url": PROXY_URL}, headers=headers)
    assert result.status_code == 401
    assert reason in result.json["description"]
    assert registry.proxies == {}


def test_registration_fails_with_502_when_the_proxy_holds_another_secret():
    # The proxy refuses the upstream's handshake call: the secrets differ.
    client, registry = make_upstream(caller_into(worker_app("site-a", b"another-secret-0123456789")))
    result = register(client)
    assert result.status_code == 502
    assert result.json["description"] == (
        f"the proxy at {PROXY_URL} answered 401: Signature required: signature does not match"
    )
    assert registry.proxies == {}


def test_registration_fails_with_502_naming_the_url_when_the_proxy_is_unreachable():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client, _ = make_upstream(call)
    result = register(client, url=url)
    assert result.status_code == 502
    assert result.json == {"title": "Handshake failed", "description": f"cannot reach {url}: Connection refused"}


def test_deregistration():
    client, registry = make_upstream(caller_into(worker_app("site-a", SECRET_A)))
    assert register(client).status_code == 201
    path = "/api/v1/agent-proxies/site-a"
    assert client.simulate_delete(path, headers=signed(SECRET_B, "site-b", "DELETE", path)).status_code == 403
    assert client.simulate_delete(path, headers=signed(SECRET_A, "site-a", "GET", path)).status_code == 401
    assert client.simulate_delete(path, headers=signed(SECRET_A, "site-a", "DELETE", path)).status_code == 204
    assert registry.proxies == {}
    gone = client.simulate_delete(path, headers=signed(SECRET_A, "site-a", "DELETE", path))
    assert gone.status_code == 404 and gone.json["description"] == "proxy site-a is not registered"


# -- the agent API


def agent_call(client, what: str, body: dict, proxy_id="site-a", secret=SECRET_A, ip="10.0.0.2", **kwargs):
    path = f"/agent/v1/{what}"
    headers = signed(secret, proxy_id, "POST", path, ip)
    headers.update(kwargs.pop("headers", {}))
    return client.simulate_post(path, json=body, headers=headers)


TOKEN = "token-of-the-agent-0123456789"


def test_agents_are_keyed_by_proxy_and_client_ip():
    client, _ = make_upstream(call)
    assert agent_call(client, "handshake", {"instance_id": "vm-1", "token": TOKEN, "ip": "10.0.0.2"}).status_code == 200
    assert agent_call(client, "handshake", {"instance_id": "vm-1", "token": TOKEN, "ip": "10.0.0.2"},
                      proxy_id="site-b", secret=SECRET_B).status_code == 200
    assert agent_call(client, "checkin", {"instance_id": "vm-1"}).json == {"status": "ok", "checkins": 1}
    agents = client.simulate_get("/operator/v1/agents").json
    assert [(a["proxy_id"], a["ip"], a["instance_id"], a["checkins"]) for a in agents] == [
        ("site-a", "10.0.0.2", "vm-1", 1), ("site-b", "10.0.0.2", "vm-1", 0),
    ]
    assert all("token" not in a for a in agents)


def test_checkin_before_handshake_is_404():
    client, _ = make_upstream(call)
    result = agent_call(client, "checkin", {"instance_id": "vm-1"})
    assert result.status_code == 404 and "handshake first" in result.json["description"]


def test_agent_calls_need_the_proxys_signature_over_the_client_ip():
    client, registry = make_upstream(call)
    body = {"instance_id": "vm-1", "token": TOKEN}
    # Signed for 10.0.0.2, claimed for 10.0.0.3: an agent cannot pose as another.
    forged = agent_call(client, "handshake", body, headers={"X-Agent-Proxy-Client-IP": "10.0.0.3"})
    assert forged.status_code == 401 and forged.json["description"] == "signature does not match"
    missing = client.simulate_post("/agent/v1/handshake", json=body)
    assert missing.status_code == 401
    assert registry.agents == {}


def test_operator_api_answers_only_operator_networks():
    client, _ = make_upstream(call)
    result = client.simulate_get("/operator/v1/agents", remote_addr="10.9.9.9")
    assert result.status_code == 403 and "10.9.9.9 may not use the operator API" in result.json["description"]


# -- commands


def southbound_into_agent(agent_app, seen: list):
    """Stand-in for the worker's southbound relay: checks the Authorization, drops it, delivers."""
    agent_client = falcon.testing.TestClient(agent_app)

    def caller(url, method, path, body=b"", headers=None, context=None, timeout=10):
        signing.verify_authorization(headers["Authorization"], SECRET_A, "site-a", method, path, 300)
        seen.append(path)
        prefix = "/_proxy/agents/10.0.0.2/2003"
        assert path.startswith(prefix)
        forwarded = {k: v for k, v in headers.items() if k != "Authorization"}
        result = agent_client.simulate_request(method, path[len(prefix):], body=body, headers=forwarded)
        return Answer(result.status_code, {k.lower(): v for k, v in result.headers.items()}, result.content)

    return caller


def command_setup(allow_token_override=False):
    state = agent.AgentState(instance_id="vm-1", token=TOKEN, ip="10.0.0.2")
    seen: list = []
    client, registry = make_upstream(southbound_into_agent(agent.create_app(state), seen), allow_token_override)
    registry.proxies["site-a"] = {"proxy_id": "site-a", "url": PROXY_URL}
    assert agent_call(client, "handshake", {"instance_id": "vm-1", "token": TOKEN, "port": 2003}).status_code == 200
    return client, state, seen


def test_command_is_signed_with_the_agents_token_and_routed_through_its_proxy():
    client, state, seen = command_setup()
    result = client.simulate_post("/operator/v1/commands", json={
        "proxy_id": "site-a", "agent_ip": "10.0.0.2", "command": "echo", "args": {"hello": 1},
    })
    assert result.status_code == 200
    assert result.json == {
        "agent_status": 200,
        "agent_body": {"instance_id": "vm-1", "command": "echo", "result": {"hello": 1}},
        "proxy_error": None,
    }
    assert seen == ["/_proxy/agents/10.0.0.2/2003/agent/v1/commands"]


def test_token_override_needs_the_flag_and_the_agent_rejects_it():
    body = {"proxy_id": "site-a", "agent_ip": "10.0.0.2", "command": "echo", "token_override": "x" * 32}
    client, _, seen = command_setup(allow_token_override=False)
    refused = client.simulate_post("/operator/v1/commands", json=body)
    assert refused.status_code == 400 and "--allow-token-override" in refused.json["description"]
    assert seen == []

    client, state, _ = command_setup(allow_token_override=True)
    result = client.simulate_post("/operator/v1/commands", json=body)
    assert result.status_code == 200
    assert result.json["agent_status"] == 401
    assert result.json["agent_body"]["description"] == "signature does not match"
    assert (state.executed, state.rejected) == (0, 1)


def test_command_to_an_unknown_agent_or_proxy_is_404():
    client, _, seen = command_setup()
    for body, text in (
        ({"proxy_id": "site-b", "agent_ip": "10.0.0.2", "command": "echo"}, "proxy site-b is not registered"),
        ({"proxy_id": "site-a", "agent_ip": "10.0.0.9", "command": "echo"}, "no agent at 10.0.0.9 behind site-a"),
    ):
        result = client.simulate_post("/operator/v1/commands", json=body)
        assert result.status_code == 404 and result.json["description"] == text
    assert seen == []


def test_root_answers_the_readiness_probe():
    client, _ = make_upstream(call)
    assert client.simulate_head("/").status_code == 200
    assert json.loads(client.simulate_get("/").text) == {"service": "agent-proxy reference upstream"}


def test_registration_stores_the_v2_answer_and_the_listing_shows_it():
    client, _ = make_upstream(caller_into(worker_app("site-a", SECRET_A)))
    assert register(client).status_code == 201
    [listed] = client.simulate_get("/operator/v1/proxies").json
    states = listed["feature_states"]
    assert states["northbound"]["state"] == "running"
    assert "agent-port-2003" in states["southbound"]["capabilities"]
    assert states["registration"]["settings"] == {"public_url": PROXY_URL}


def test_registration_falls_back_to_the_classic_feature_list():
    real = caller_into(worker_app("site-a", SECRET_A))

    def older_proxy(url, method, path, body=b"", headers=None, context=None, timeout=10):
        if path.endswith("/_proxy/v2/features"):  # a proxy from before v2
            return Answer(404, {}, b'{"title": "Not Found"}')
        return real(url, method, path, body, headers, context, timeout)

    client, _ = make_upstream(older_proxy)
    assert register(client).status_code == 201
    [listed] = client.simulate_get("/operator/v1/proxies").json
    assert listed["feature_states"] == {
        name: {"state": "running", "settings": {}, "capabilities": []}
        for name in ("northbound", "southbound", "registration", "metrics")
    }
