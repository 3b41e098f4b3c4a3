"""haproxy/keepalived.conf.j2: rendered through the CLI and checked by keepalived's own config test.

(Its behaviour, the address moving when a balancer's HAProxy or keepalived dies, is
tested in the namespace lab: tests/lab/test_balancer_pair.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from agent_proxy.cli import main
from kit import AGENT_PROXY, netns, write_config

KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"
PAIR = ["--set", "interface=eth1", "--set", "virtual_address=10.1.2.3/24", "--set", "priority=150",
        "--set", "peers=[10.1.2.5]", "--set", "source_address=10.1.2.4"]


def render(capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    code = main(["render", "keepalived", "-c", str(write_config(tmp_path, "https://8.7.6.5:3302")), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def scratch_ns():
    """A namespace with an interface eth1 (one end of a veth pair inside it): keepalived -t checks that the interface exists."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a scratch network namespace")
    name = f"aprk{os.getpid() % 100000}"
    netns.add(name)
    try:
        netns.run(["ip", "-n", name, "link", "add", "eth1", "type", "veth", "peer", "name", "eth2"])
        yield name
    finally:
        netns.delete(name)


def problems(namespace: str, tmp_path, text: str) -> str:
    # keepalived 2.2's -t ends with SIGTERM whatever it finds; it prints the problems.
    path = tmp_path / "keepalived.conf"
    path.write_text(text)
    done = netns.ns_run(namespace, [KEEPALIVED, "-t", "-f", str(path)], check=False)
    return (done.stdout + done.stderr).strip()


@pytest.mark.skipif(not shutil.which("keepalived"), reason="keepalived is not installed (make deps)")
def test_a_pair_member_renders_and_passes_keepalived_config_test(capsys, tmp_path, scratch_ns):
    code, out, err = render(capsys, tmp_path, *PAIR)
    assert code == 0, err
    assert problems(scratch_ns, tmp_path, out) == ""
    assert "unicast_src_ip 10.1.2.4" in out and "\n        10.1.2.5\n" in out
    assert "10.1.2.3/24 dev eth1" in out and "priority 150" in out and "nopreempt" in out
    assert 'script "/usr/bin/curl -s -o /dev/null --max-time 1 http://127.0.0.1:8404/_lb/health"' in out


@pytest.mark.skipif(not shutil.which("keepalived"), reason="keepalived is not installed (make deps)")
def test_the_config_test_catches_a_bad_file(tmp_path, capsys, scratch_ns):
    code, out, _ = render(capsys, tmp_path, *PAIR)
    assert "Unknown keyword 'nopreemptx'" in problems(scratch_ns, tmp_path, out.replace("nopreempt", "nopreemptx"))


def test_the_check_and_its_timing_can_be_set(capsys, tmp_path):
    code, out, err = render(capsys, tmp_path, *PAIR, "--set", "check_command=/usr/local/bin/lb-alive",
                            "--set", "check_interval=2", "--set", "advert_int=2", "--set", "router_id=7")
    assert code == 0, err
    assert 'script "/usr/local/bin/lb-alive"' in out
    assert "interval 2" in out and "advert_int 2" in out and "virtual_router_id 7" in out


def test_every_missing_variable_is_named_at_once(tmp_path):
    config = write_config(tmp_path, "https://8.7.6.5:3302")
    done = subprocess.run([AGENT_PROXY, "render", "keepalived", "-c", str(config), "--set", "priority=150"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("agent-proxy: render keepalived: missing variables: 'interface', 'peers', 'virtual_address' "
                           "are undefined (pass them with --set or --vars)\n")
    done = subprocess.run([AGENT_PROXY, "render", "keepalived", "-c", str(config), *PAIR[:6]],
                          capture_output=True, text=True, timeout=60)
    assert done.stderr == "agent-proxy: render keepalived: missing variable: 'peers' is undefined (pass it with --set or --vars)\n"
