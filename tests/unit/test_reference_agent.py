"""The reference agent's command port and backoff, without a server."""

from __future__ import annotations

import json
import os
import random
import time

import falcon.testing
import pytest

from agent_proxy.reference import agent, commands

TOKEN = "token-of-the-agent-0123456789"


@pytest.fixture
def state():
    return agent.AgentState(instance_id="vm-1", token=TOKEN, ip="10.0.0.2")


@pytest.fixture
def client(state):
    return falcon.testing.TestClient(agent.create_app(state))


def send(client, body: dict, token: str = TOKEN, instance_id: str = "vm-1", ts: int | None = None, signature: str | None = None):
    raw = json.dumps(body).encode()
    header = signature if signature is not None else commands.sign(token, instance_id, raw, ts=ts)
    return client.simulate_post("/agent/v1/commands", body=raw, headers={commands.HEADER: header})


def test_echo_and_report(client, state):
    echoed = send(client, {"instance_id": "vm-1", "command": "echo", "args": ["a", 1]})
    assert echoed.status_code == 200
    assert echoed.json == {"instance_id": "vm-1", "command": "echo", "result": ["a", 1]}
    report = send(client, {"instance_id": "vm-1", "command": "report"}).json["result"]
    assert report["instance_id"] == "vm-1" and report["ip"] == "10.0.0.2"
    assert report["commands_executed"] == 2 and report["commands_rejected"] == 0


@pytest.mark.parametrize("kwargs, reason", [
    ({"token": "some-other-token-0123456789"}, "signature does not match"),
    ({"instance_id": "vm-2"}, "signature does not match"),
    ({"ts": int(time.time()) - 3600}, "s off (allowed: 300 s)"),
    ({"signature": ""}, "missing X-Agent-Command-Signature"),
    ({"signature": "cmd-v1 ts=1, sig=zz"}, "malformed signature"),
])
def test_badly_signed_commands_are_401_and_not_run(client, state, kwargs, reason):
    result = send(client, {"instance_id": "vm-1", "command": "echo", "args": "x"}, **kwargs)
    assert result.status_code == 401
    assert reason in result.json["description"]
    assert (state.executed, state.rejected) == (0, 1)


def test_a_tampered_body_is_401(client, state):
    header = commands.sign(TOKEN, "vm-1", json.dumps({"instance_id": "vm-1", "command": "echo", "args": 1}).encode())
    result = send(client, {"instance_id": "vm-1", "command": "echo", "args": 2}, signature=header)
    assert result.status_code == 401 and state.executed == 0


def test_a_replayed_command_is_401(client, state):
    raw = json.dumps({"instance_id": "vm-1", "command": "echo"}).encode()
    header = {commands.HEADER: commands.sign(TOKEN, "vm-1", raw)}
    assert client.simulate_post("/agent/v1/commands", body=raw, headers=header).status_code == 200
    again = client.simulate_post("/agent/v1/commands", body=raw, headers=header)
    assert again.status_code == 401 and "replay" in again.json["description"]
    assert state.executed == 1


def test_unknown_commands_are_400(client, state):
    result = send(client, {"instance_id": "vm-1", "command": "rm", "args": ["-rf", "/"]})
    assert result.status_code == 400
    assert result.json["description"] == "'rm' is not one of echo, report"
    assert state.executed == 0


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    rng = random.Random(1)
    for failures, ceiling in ((1, 1), (2, 2), (3, 4), (4, 8), (10, 30), (50, 30)):
        delays = [agent.backoff_delay(failures, 1.0, 30.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, min(delays), max(delays))
        assert len(set(delays)) > 1  # jitter


def test_own_ip_is_the_source_address_towards_the_endpoint():
    assert agent.own_ip("https://127.0.0.1:2002") == "127.0.0.1"


def test_state_file_keeps_instance_id_and_token_across_restarts(tmp_path):
    path = str(tmp_path / "agent.json")
    first = agent._load_state(path, None)
    again = agent._load_state(path, None)
    assert (again.instance_id, again.token) == (first.instance_id, first.token)
    assert first.instance_id.startswith("agent-") and len(first.token) >= 32
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert agent._load_state(path, "vm-9").instance_id == "vm-9"
