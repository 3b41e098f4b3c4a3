"""The route table: every route against every kind of caller, and nothing outside the table.

A request the guard refuses carries one of its codes (401 bad-signature, 403
source-not-allowed, 404 not-found); a request it lets through reaches the route's handler,
which answers in its own way (200, a 503 from ready, a 502 from an unreachable upstream
on 127.0.0.1:9, a 403 target-not-allowed from the southbound target check).
"""

import falcon.testing
import pytest

from agent_proxy import signing
from agent_proxy.app import PROXY_PREFIX, ROUTES, Policy, Route, create_app
from tests.unit.test_app import SECRET, make_config
from tests.unit.test_errors import readme_table

GUARD_CODES = {"bad-signature", "source-not-allowed", "not-found"}

# Who calls: (source address, signed by the upstream?)
CALLERS = {
    "stranger": ("192.0.2.99", False),
    "stranger-signed": ("192.0.2.99", True),
    "agent": ("10.0.0.5", False),
    "upstream-unsigned": ("8.7.6.5", False),
    "upstream-signed": ("8.7.6.5", True),
    "front": ("127.0.0.1", False),  # trusted_proxies, no X-Forwarded-For: a local scraper
}

ALLOWED = None
# policy -> caller -> ALLOWED or the (status, code) the guard answers. The contract, written out.
EXPECTED = {
    Policy.OPEN: {caller: ALLOWED for caller in CALLERS},
    Policy.AGENTS: {
        "stranger": (403, "source-not-allowed"), "stranger-signed": (403, "source-not-allowed"),
        "agent": ALLOWED, "upstream-unsigned": (403, "source-not-allowed"),
        "upstream-signed": (403, "source-not-allowed"), "front": (403, "source-not-allowed"),
    },
    Policy.UPSTREAM: {
        "stranger": (403, "source-not-allowed"), "stranger-signed": (403, "source-not-allowed"),
        "agent": (403, "source-not-allowed"), "upstream-unsigned": (401, "bad-signature"),
        "upstream-signed": ALLOWED, "front": (403, "source-not-allowed"),
    },
    Policy.METRICS: {
        "stranger": (403, "source-not-allowed"), "stranger-signed": (403, "source-not-allowed"),
        "agent": (403, "source-not-allowed"), "upstream-unsigned": ALLOWED,
        "upstream-signed": ALLOWED, "front": ALLOWED,
    },
}


def example_path(route: Route) -> str:
    if not route.prefix:
        return route.path
    if route.path.startswith(PROXY_PREFIX):  # southbound: a port the config does not allow
        return route.path + "10.0.0.2/9999/status"
    return "/agent/v1/checkin"


def call(client, route: Route, caller: str, path: str | None = None):
    ip, is_signed = CALLERS[caller]
    path = path or example_path(route)
    method = "GET" if route.methods == "ANY" else route.methods
    headers = {"Authorization": signing.authorization(SECRET, "site-a", method, path)} if is_signed else {}
    body = b'{"nonce": "n0nce-abcdef"}' if method == "POST" else None
    return client.simulate_request(method, path, remote_addr=ip, headers=headers, body=body)


@pytest.fixture(scope="module")
def client():
    return falcon.testing.TestClient(create_app(make_config(), SECRET))


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.methods} {r.path}")
def test_each_route_answers_each_caller_by_its_policy(client, route, caller):
    result = call(client, route, caller)
    expected = EXPECTED[route.policy][caller]
    if expected is ALLOWED:
        assert result.headers.get("X-Agent-Proxy-Error") not in GUARD_CODES, result.text
    else:
        assert (result.status_code, result.headers.get("X-Agent-Proxy-Error")) == expected


@pytest.mark.parametrize("path", ["/_proxy/", "/_proxy/nothing", "/_proxy/health/", "/_proxy/healthz", "/_proxy/agents", "/_proxy/v2/features/x"])
@pytest.mark.parametrize("caller", CALLERS)
def test_undeclared_proxy_paths_are_404_for_everyone(client, path, caller):
    ip, is_signed = CALLERS[caller]
    headers = {"Authorization": signing.authorization(SECRET, "site-a", "GET", path)} if is_signed else {}
    result = client.simulate_get(path, remote_addr=ip, headers=headers)
    assert (result.status_code, result.headers["X-Agent-Proxy-Error"]) == (404, "not-found")


def test_a_route_cannot_be_declared_without_a_policy():
    with pytest.raises(TypeError):
        Route("GET", "/_proxy/new", direction="local", build=lambda proxy: None)
    with pytest.raises(TypeError):
        Route("GET", "/_proxy/new", None, "local", lambda proxy: None)
    with pytest.raises(TypeError):
        Route("GET", "/_proxy/new", "open", "local", lambda proxy: None)


class Secret:
    def on_get(self, req, resp):
        resp.content_type = "text/plain"
        resp.text = "secret"


def test_a_route_cannot_be_added_beside_the_table():
    worker = create_app(make_config(), SECRET)
    with pytest.raises(RuntimeError, match="app.ROUTES"):
        worker.falcon_app.add_route("/_proxy/secret", Secret())
    with pytest.raises(RuntimeError, match="app.ROUTES"):
        worker.falcon_app.add_sink(Secret().on_get, prefix="^/_proxy/secret")


def test_a_route_slipped_into_the_router_is_still_404():
    worker = create_app(make_config(), SECRET)
    worker.falcon_app._router.add_route("/_proxy/secret", Secret())  # behind the table's back
    result = falcon.testing.TestClient(worker).simulate_get("/_proxy/secret", remote_addr="8.7.6.5")
    assert result.status_code == 404 and result.text != "secret"


def test_a_new_route_in_the_table_gets_its_policy():
    routes = ROUTES + (Route("GET", "/_proxy/secret", Policy.UPSTREAM, "control", lambda proxy: Secret()),)
    client = falcon.testing.TestClient(create_app(make_config(), SECRET, routes=routes))
    assert call(client, routes[-1], "stranger").status_code == 403
    assert call(client, routes[-1], "upstream-unsigned").status_code == 401
    assert call(client, routes[-1], "upstream-signed").text == "secret"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.methods} {r.path}")
def test_with_listen_control_each_route_is_on_its_listener(route):
    agent_port, control_port = 8002, 9002
    client = falcon.testing.TestClient(create_app(make_config(), SECRET, control_port=control_port))
    caller = next(c for c, e in EXPECTED[route.policy].items() if e is ALLOWED)
    ip, is_signed = CALLERS[caller]
    for port in (agent_port, control_port):
        path = example_path(route)
        method = "GET" if route.methods == "ANY" else route.methods
        headers = {"Authorization": signing.authorization(SECRET, "site-a", method, path)} if is_signed else {}
        body = b'{"nonce": "n0nce-abcdef"}' if method == "POST" else None
        result = client.simulate_request(method, path, remote_addr=ip, headers=headers, body=body, extras={"SERVER_PORT": str(port)})
        served = route.policy is Policy.OPEN or (port == control_port) == route.policy.upstream_facing
        if served:
            assert result.headers.get("X-Agent-Proxy-Error") not in GUARD_CODES, (port, result.text)
        else:
            assert (result.status_code, result.headers["X-Agent-Proxy-Error"]) == (404, "not-found"), port


def test_readme_route_table_is_the_table():
    rows = readme_table("| method and path | who may call it | does |")
    assert len(rows) == len(ROUTES)
    for (path_cell, who, _does), route in zip(rows, ROUTES):
        assert path_cell.startswith(f"`{route.methods} {route.path}"), path_cell
        assert who == route.policy.value
