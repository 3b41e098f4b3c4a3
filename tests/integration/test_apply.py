"""`agent-proxy apply --no-reload` and `agent-proxy status` as real commands.

apply renders and tests with the real iptables-restore / ip6tables-restore --test and
haproxy -c (nothing is committed to the kernel). Reloading goes through systemd, which is
not PID 1 here: packer/test-image.sh drives that part on the booted appliance.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from kit import AGENT_PROXY, SECRET, start_origin, start_worker, write_config


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT_PROXY, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def node(tmp_path):
    """A config with its key material, the firewall folder and the front with their
    variables (as the roles write them), and the files an earlier apply installed."""
    config = write_config(tmp_path / "etc", "http://127.0.0.1:9", front={"workers": 1})
    firewall = tmp_path / "firewall"
    firewall.mkdir()
    (firewall / "vars.yaml").write_text("admin_networks: [10.0.2.2/32, 'fd00::/8']\nssh_port: 22\n")
    (tmp_path / "front-vars.yaml").write_text("check_inter: 7s\nlog_format: raw\n")
    front = tmp_path / "haproxy.cfg"
    for path in (firewall / "rules.v4", firewall / "rules.v6", front, key_map(config)):
        path.write_text("# installed earlier\n")
    key_map(config).chmod(0o600)
    return config, firewall, front


def key_map(config) -> Path:
    return config.parent / "psk.haproxy-map"


def apply_argv(config, firewall, front) -> list[str]:
    return ["apply", "-c", str(config), "--firewall-dir", str(firewall), "--front-config", str(front),
            "--front-vars", str(front.parent / "front-vars.yaml")]


def apply(config, firewall, front):
    return run(*apply_argv(config, firewall, front), "--no-reload")


def installed(firewall, front) -> dict[str, str]:
    """Every file apply may write: the firewall folder, the front and its signing key map."""
    return {str(p): p.read_text() for p in sorted([*firewall.iterdir(), front, *front.parent.glob("etc/psk.haproxy-map*")])}


def test_apply_checks_renders_tests_and_installs_both_firewalls_and_the_front(node):
    config, firewall, front = node
    done = apply(config, firewall, front)
    assert done.returncode == 0, done.stderr
    assert "installed; nothing reloaded (--no-reload)" in done.stdout
    v4, v6 = (firewall / "rules.v4").read_text(), (firewall / "rules.v6").read_text()
    assert "-A INPUT -s 10.0.2.2/32 -p tcp -m tcp --dport 22" in v4
    assert "-A INPUT -s fd00::/8 -p tcp -m tcp --dport 22" in v6
    assert "frontend agent_proxy" in front.read_text()
    assert sorted(p.name for p in firewall.iterdir()) == ["rules.v4", "rules.v6", "vars.yaml"]
    # The front's variables from the node's file, as the role rendered them.
    assert "default-server check inter 7s " in front.read_text()
    assert "log stdout len 65535 format raw local0 info" in front.read_text()
    assert key_map(config).read_text() == f"key {base64.b64encode(SECRET.encode()).decode()}\n"
    assert sorted(p.name for p in key_map(config).parent.glob("psk*")) == ["psk", "psk.haproxy-map"]


def test_apply_brings_a_rotated_secret_to_the_front_and_makes_a_missing_key_map(node):
    config, firewall, front = node
    key_map(config).unlink()
    assert apply(config, firewall, front).returncode == 0
    assert key_map(config).stat().st_mode & 0o7777 == 0o600
    assert key_map(config).read_text() == f"key {base64.b64encode(SECRET.encode()).decode()}\n"
    rotated = "b" * 40
    (config.parent / "psk").write_text(rotated + "\n")
    done = apply(config, firewall, front)
    assert done.returncode == 0, done.stderr
    assert key_map(config).read_text() == f"key {base64.b64encode(rotated.encode()).decode()}\n"
    assert key_map(config).stat().st_mode & 0o7777 == 0o600


def test_unreadable_front_variables_change_nothing_and_name_the_file(node):
    config, firewall, front = node
    (front.parent / "front-vars.yaml").write_text("- not a mapping\n")
    before = installed(firewall, front)
    done = apply(config, firewall, front)
    assert done.returncode == 2
    assert done.stderr == f"agent-proxy: {front.parent / 'front-vars.yaml'}: the template variables must be a mapping\n"
    assert installed(firewall, front) == before


def test_a_broken_config_changes_nothing_and_names_the_key(node):
    config, firewall, front = node
    data = yaml.safe_load(config.read_text())
    data["networks"]["agents"] = ["10.0.0.0/33"]
    config.write_text(yaml.safe_dump(data))
    before = installed(firewall, front)
    done = apply(config, firewall, front)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "networks.agents" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert installed(firewall, front) == before


def test_rules_that_fail_iptables_restore_test_change_nothing(node):
    config, firewall, front = node
    (firewall / "vars.yaml").write_text("admin_networks: [10.0.2.2/32]\nssh_port: not-a-port\n")
    before = installed(firewall, front)
    done = apply(config, firewall, front)
    assert done.returncode == 1
    assert done.stderr.startswith("agent-proxy: firewall-node rendered from ") and "iptables-restore" in done.stderr
    assert installed(firewall, front) == before


def status_of_a_serving_worker(tmp_path, **overrides):
    """`status --json` while one worker serves the config: (the command, its rows, the
    config file, the origin's URL)."""
    origin, origin_url = start_origin(tmp_path)
    config = write_config(tmp_path / "etc", origin_url, front={"workers": 1}, **overrides)
    worker = start_worker(config, tmp_path)
    try:
        done = run("status", "--json", "-c", str(config))
    finally:
        worker.stop()
        origin.stop()
    return done, json.loads(done.stdout), config, origin_url


def test_status_reports_every_field(tmp_path):
    done, shown, config, origin_url = status_of_a_serving_worker(tmp_path)
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    for label in ("host", "addresses", "proxy id", "upstream", "public url", "certificate", "features",
                  f"worker {port}", "front", "failed units", "first boot", "registration"):
        assert shown.get(label), f"status has no {label!r}: {shown}"
    assert shown["proxy id"] == "site-a"
    assert shown["features"] == "all configured features running"
    assert shown["upstream"] == f"{origin_url} (1/1 workers ready)"
    assert shown["certificate"].startswith("SHA-256 ") and "expires " in shown["certificate"]
    assert shown[f"worker {port}"].endswith(", ready")
    # systemd is not PID 1 here, so the units' state is unknown: not serving.
    assert done.returncode == 1 and shown["serving"] is False


def test_status_names_a_failed_feature_on_a_serving_node(tmp_path):
    # The worker starts with southbound failed (its CA file is missing): status shows the
    # node as the worker runs it, with the feature and the reason, not the file as invalid.
    missing = tmp_path / "no-such-ca.pem"
    done, shown, _, origin_url = status_of_a_serving_worker(tmp_path, agents={"ca_file": str(missing)})
    assert "config" not in shown, shown
    assert shown["features"] == f"southbound FAILED: agents.ca_file: cannot read file {missing}"
    assert shown["upstream"] == f"{origin_url} (1/1 workers ready)"
    assert done.returncode == 1 and shown["serving"] is False


def test_a_failed_reload_puts_the_previous_files_back(node, tmp_path):
    # systemd is not PID 1 here: a stand-in systemctl records the reloads and fails the
    # front's, as a front that does not come back would.
    config, firewall, front = node
    bin_dir, calls = tmp_path / "bin", tmp_path / "systemctl.calls"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        'case "$*" in *agent-proxy-front.service) echo "Job for agent-proxy-front.service failed." >&2; exit 1;; esac\n')
    (bin_dir / "systemctl").chmod(0o755)
    before = installed(firewall, front)
    done = subprocess.run(
        [AGENT_PROXY, *apply_argv(config, firewall, front)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 1
    assert done.stderr.startswith("agent-proxy: reloading the front failed: Job for agent-proxy-front.service failed.")
    assert installed(firewall, front) == before
    port = yaml.safe_load(config.read_text())["listen"]["port"]
    assert calls.read_text().splitlines() == [
        "reload-or-restart agent-proxy-firewall.service",
        f"reload-or-restart agent-proxy@{port}.service",
        "reload-or-restart agent-proxy-front.service",
        "reload-or-restart agent-proxy-firewall.service",  # the previous rules applied again
    ]
