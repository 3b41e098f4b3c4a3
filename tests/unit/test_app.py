"""The worker's own endpoints and its gatekeeping, through falcon.testing (no server)."""

import secrets
import time

import falcon.testing
import pytest

from agent_proxy import config as configuration, signing
from agent_proxy.app import create_app

SECRET = b"unit-test-secret-0123456789abcdef"


def make_config(**overrides):
    data = {
        "proxy_id": "site-a",
        "public_url": "https://4.3.2.1:2002",
        "upstream": {"url": "https://127.0.0.1:9", "connect_timeout": 0.5, "ready_window": 60},
        "networks": {"agents": ["10.0.0.0/24"], "upstream": ["8.7.6.5/32"]},
        "trusted_proxies": ["127.0.0.1"],
    }
    data.update(overrides)
    return configuration.parse(data, "test", environ={})


@pytest.fixture
def client():
    return falcon.testing.TestClient(create_app(make_config(), SECRET))


def signed(method, path, secret=SECRET, proxy_id="site-a", ts=None):
    return {"Authorization": signing.authorization(secret, proxy_id, method, path, ts=ts)}


UPSTREAM = "8.7.6.5"


def test_health_answers_anyone(client):
    result = client.simulate_get("/_proxy/health", remote_addr="192.0.2.99")
    assert result.status_code == 200 and result.json == {"status": "ok"}


def test_features_lists_running_features(client):
    assert client.simulate_get("/_proxy/features").json == ["northbound", "southbound", "registration", "metrics"]


def test_v2_features_is_signed_and_shaped_like_foreman(client):
    assert client.simulate_get("/_proxy/v2/features", remote_addr=UPSTREAM).status_code == 401
    result = client.simulate_get("/_proxy/v2/features", remote_addr=UPSTREAM, headers=signed("GET", "/_proxy/v2/features"))
    assert result.status_code == 200
    assert set(result.json) == {"northbound", "southbound", "registration", "metrics"}
    for feature in result.json.values():
        assert feature["state"] in ("uninitialized", "loaded", "starting", "running", "disabled", "failed")
        assert set(feature) == {"state", "http_enabled", "https_enabled", "settings", "capabilities"}
        assert (feature["http_enabled"], feature["https_enabled"]) == (False, True)
    assert result.json["northbound"]["settings"]["upstream_url"] == "https://127.0.0.1:9"
    assert "hmac-sha256" in result.json["northbound"]["capabilities"]
    assert {"agent-tls", "agent-port-2003"} <= set(result.json["southbound"]["capabilities"])


@pytest.mark.parametrize("nonce", ["n0nce-abcdef", "A.b_c~d-9", "x" * 256, secrets.token_urlsafe(24)])
def test_handshake_signs_the_nonce_back(client, nonce):
    result = client.simulate_post(
        "/_proxy/handshake", remote_addr=UPSTREAM, json={"nonce": nonce},
        headers=signed("POST", "/_proxy/handshake"),
    )
    assert result.status_code == 200
    assert result.json["proxy_id"] == "site-a" and result.json["nonce"] == nonce
    signing.verify_signature_header(
        result.headers["X-Agent-Proxy-Signature"], SECRET, "site-a", "HANDSHAKE", nonce,
    )


@pytest.mark.parametrize("body", [
    {"nonce": "short"}, {"nonce": "x" * 257}, {"nonce": 5}, {}, [1],
    # not URL-safe: base64's own characters, a space, a quote, a non-ASCII letter, a newline
    {"nonce": "abc/def+ghi="}, {"nonce": "abcd efgh"}, {"nonce": 'abcd"efgh'}, {"nonce": "abcdéfgh"},
    {"nonce": "abcdefgh\n"},
])
def test_handshake_rejects_bad_nonces(client, body):
    result = client.simulate_post("/_proxy/handshake", remote_addr=UPSTREAM, json=body, headers=signed("POST", "/_proxy/handshake"))
    assert result.status_code == 400 and result.headers["X-Agent-Proxy-Error"] == "bad-nonce"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        signed("POST", "/_proxy/handshake", secret=b"a-forged-secret-of-enough-length"),
        signed("POST", "/_proxy/handshake", ts=int(time.time()) - 3600),
        signed("POST", "/_proxy/other"),
        signed("GET", "/_proxy/handshake"),
        signed("POST", "/_proxy/handshake", proxy_id="site-b"),
    ],
    ids=["missing", "forged", "stale", "wrong-path", "wrong-method", "wrong-proxy"],
)
def test_bad_signatures_are_401_with_json(client, headers):
    result = client.simulate_post("/_proxy/handshake", remote_addr=UPSTREAM, json={"nonce": "n0nce-abcdef"}, headers=headers)
    assert result.status_code == 401
    assert result.headers["X-Agent-Proxy-Error"] == "bad-signature"
    assert set(result.json) == {"title", "description"}


def test_control_endpoints_refuse_sources_outside_networks_upstream(client):
    result = client.simulate_post("/_proxy/handshake", remote_addr="10.0.0.2", json={"nonce": "n0nce-abcdef"}, headers=signed("POST", "/_proxy/handshake"))
    assert result.status_code == 403 and result.headers["X-Agent-Proxy-Error"] == "source-not-allowed"


def test_northbound_refuses_sources_outside_networks_agents(client):
    result = client.simulate_get("/agent/v1/checkin", remote_addr="10.9.9.9")
    assert result.status_code == 403 and result.headers["X-Agent-Proxy-Error"] == "source-not-allowed"


def test_forwarded_for_is_believed_only_from_trusted_proxies(client):
    # From an untrusted peer, a forged X-Forwarded-For changes nothing.
    result = client.simulate_get("/agent/v1/checkin", remote_addr="10.9.9.9", headers={"X-Forwarded-For": "10.0.0.2"})
    assert result.status_code == 403 and "10.9.9.9" in result.json["description"]
    # From the trusted front, the address it appended is the client.
    result = client.simulate_get("/agent/v1/checkin", remote_addr="127.0.0.1", headers={"X-Forwarded-For": "10.0.0.2, 10.9.9.9"})
    assert result.status_code == 403 and "10.9.9.9" in result.json["description"]


def test_unknown_proxy_paths_are_never_relayed(client):
    result = client.simulate_get("/_proxy/unknown", remote_addr="10.0.0.2")
    assert result.status_code == 404 and result.headers["X-Agent-Proxy-Error"] == "not-found"


def test_southbound_checks_signature_before_target(client):
    assert client.simulate_get("/_proxy/agents/127.0.0.1/2003/x", remote_addr=UPSTREAM).status_code == 401
    result = client.simulate_get("/_proxy/agents/127.0.0.1/2003/x", remote_addr=UPSTREAM, headers=signed("GET", "/_proxy/agents/127.0.0.1/2003/x"))
    assert result.status_code == 403 and result.headers["X-Agent-Proxy-Error"] == "target-forbidden"


def test_upstream_down_is_502_and_ready_503(client):
    result = client.simulate_get("/agent/v1/checkin", remote_addr="10.0.0.2")
    assert result.status_code == 502 and result.headers["X-Agent-Proxy-Error"] == "upstream-unreachable"
    ready = client.simulate_get("/_proxy/ready")
    assert ready.status_code == 503 and "cannot reach the upstream" in ready.json["description"]


def test_body_over_the_limit_is_413(client):
    app = create_app(make_config(limits={"max_body_bytes": 10}), SECRET)
    result = falcon.testing.TestClient(app).simulate_post("/x", remote_addr="10.0.0.2", body=b"x" * 11)
    assert result.status_code == 413 and result.headers["X-Agent-Proxy-Error"] == "body-too-large"


def test_metrics_for_upstream_and_local_scrapers_only(client):
    assert client.simulate_get("/_proxy/metrics", remote_addr="10.0.0.2").status_code == 403
    client.simulate_get("/_proxy/health")
    result = client.simulate_get("/_proxy/metrics", remote_addr="127.0.0.1")
    assert result.status_code == 200
    assert 'agent_proxy_requests_total{code="200",direction="local"} 1.0' in result.text


def test_absolute_form_targets_are_refused(client):
    result = client.simulate_get("/x", remote_addr="10.0.0.2", extras={"REQUEST_URI": "http://evil.example/x"})
    assert result.status_code == 400 and result.headers["X-Agent-Proxy-Error"] == "bad-target"


def test_each_app_has_its_own_state():
    first = falcon.testing.TestClient(create_app(make_config(), SECRET))
    second = falcon.testing.TestClient(create_app(make_config(), SECRET))
    first.simulate_get("/_proxy/health")
    text = second.simulate_get("/_proxy/metrics").text
    assert 'direction="local"' not in text


def test_a_captured_signature_is_replayable_for_twice_the_skew(client):
    # README, Security: a request signed by a clock one skew ahead of the node's is
    # accepted from the moment it is captured until one skew after its timestamp.
    skew = make_config().limits.auth_skew_seconds
    assert skew == 300  # the documented default
    path = "/_proxy/v2/features"

    def answered(signed_at):
        return client.simulate_get(path, remote_addr=UPSTREAM, headers=signed("GET", path, ts=signed_at)).status_code

    now = int(time.time())  # 5 s margins: this test may be slow on a busy machine
    assert answered(now + skew - 5) == 200  # signed ahead: replayable for 2 x skew from now
    assert answered(now - skew + 5) == 200  # the same moment's capture, one skew later
    assert answered(now - skew - 5) == 401
    assert answered(now + skew + 5) == 401
