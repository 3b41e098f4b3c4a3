"""Registration at boot (appliance/firstboot/agent-proxy-register, the image's
agent-proxy-register.service): the real script against a real node (workers behind the
HAProxy front rendered from the template) and the reference upstream, on loopback. The
script's paths point into the test's folders (REGISTER_CONFIG, REGISTER_VENV, REGISTER_STATE_DIR).
Each run must print one line and exit 0: a boot never fails for registration.

Then `agent-proxy register --wait-front`, which the script runs, as a user runs it: waiting
for a front that comes up late, giving up on one that never answers, refusing a bad wait.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from kit import (
    AGENT_PROXY, REPO, VENV_BIN, free_port, render, start_haproxy, start_node, start_upstream, wait_for_port,
)

SCRIPT = REPO / "appliance" / "firstboot" / "agent-proxy-register"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    proc, url, ca = start_upstream(tmp_path_factory.mktemp("upstream"), "--insecure-proxy-tls")
    yield {"url": url, "ca": ca}
    proc.stop()


@pytest.fixture(scope="module")
def node(upstream, tmp_path_factory):
    front_port = free_port()
    node = start_node(tmp_path_factory.mktemp("node"), upstream["url"], workers=1, front_port=front_port,
                      public_url=f"https://127.0.0.1:{front_port}", upstream={"ca_file": upstream["ca"]})
    yield node
    node.stop()


# What the script may find on PATH: what a minimal Debian (the image) has. No curl there.
IMAGE_TOOLS = ("tr", "sed", "date", "install", "mktemp", "rm")


def boot_registration(config: Path, state: Path, front_wait: int = 10) -> subprocess.CompletedProcess:
    tools = state.parent / "image-bin"
    if not tools.exists():
        tools.mkdir()
        for tool in IMAGE_TOOLS:
            (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tools), "REGISTER_CONFIG": str(config), "REGISTER_VENV": str(VENV_BIN.parent),
           "REGISTER_STATE_DIR": str(state), "REGISTER_FRONT_WAIT": str(front_wait)}
    return subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)


def one_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == "" and run.stdout.count("\n") == 1, run.stdout + run.stderr
    return run.stdout.strip()


def registered(upstream) -> list[tuple[str, str]]:
    result = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", upstream["ca"],
                             upstream["url"] + "/operator/v1/proxies"], capture_output=True, text=True, timeout=30)
    return [(p["proxy_id"], p["url"]) for p in yaml.safe_load(result.stdout)]


def variant(node, tmp_path: Path, **changes) -> Path:
    """The node's config with ``changes`` (dotted keys), written beside the test."""
    data = yaml.safe_load(node.config.read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        section = data
        for key in path:
            section = section.setdefault(key, {})
        section[last] = value
    other = tmp_path / "agent-proxy.yaml"
    other.write_text(yaml.safe_dump(data))
    return other


def test_registers_once_then_skips_at_later_boots(node, upstream, tmp_path):
    first = one_line(boot_registration(node.config, tmp_path / "state"))
    assert first == (f"agent-proxy-register: OK: site-a registered with {upstream['url']}; the upstream reached "
                     f"this proxy at {node.url} (features: northbound, southbound, registration, metrics)")
    assert registered(upstream) == [("site-a", node.url)]
    mark = (tmp_path / "state" / "registered-at-boot").read_text()
    assert mark.endswith(f"UTC: {first.removeprefix('agent-proxy-register: OK: ')}\n")

    again = one_line(boot_registration(node.config, tmp_path / "state"))
    assert again == f"agent-proxy-register: SKIPPED: registered at an earlier boot ({mark.strip()})"


def test_an_unreachable_upstream_is_one_failed_line_and_no_mark(node, tmp_path):
    closed = f"https://127.0.0.1:{free_port()}"
    line = one_line(boot_registration(variant(node, tmp_path, **{"upstream.url": closed}), tmp_path / "state"))
    assert line.startswith(f"agent-proxy-register: FAILED: cannot reach the upstream {closed}")
    assert line.endswith("(the proxy serves unregistered; when the upstream can reach it: sudo agent-proxy register)")
    assert not (tmp_path / "state").exists()


def test_the_image_placeholder_upstream_is_skipped(node, tmp_path):
    config = variant(node, tmp_path, **{"upstream.url": "https://upstream.invalid:3302"})
    line = one_line(boot_registration(config, tmp_path / "state"))
    assert line == (f"agent-proxy-register: SKIPPED: no upstream configured (upstream.url is https://upstream.invalid:3302); "
                    f"set it in {config}, then: sudo agent-proxy register")


def test_a_front_that_does_not_answer_is_one_failed_line(node, tmp_path):
    port = free_port()
    line = one_line(boot_registration(variant(node, tmp_path, **{"front.port": port}), tmp_path / "state", front_wait=1))
    assert line.startswith(f"agent-proxy-register: FAILED: the front did not answer https://127.0.0.1:{port}/_proxy/health within 1 s")


# -- agent-proxy register --wait-front


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT_PROXY, *args], capture_output=True, text=True, timeout=60)


def nothing_registered(node, upstream) -> None:
    """A clean upstream, so that a registration shows in registered()."""
    gone = cli("deregister", "-c", str(node.config))
    assert gone.returncode == 0, gone.stderr
    assert registered(upstream) == []


def test_register_waits_for_a_front_that_comes_up_late(node, upstream, tmp_path):
    port = free_port()
    late = f"https://127.0.0.1:{port}"
    config = variant(node, tmp_path, **{"front.port": port, "front.stats_socket": str(tmp_path / "late.sock"),
                                        "public_url": late})
    nothing_registered(node, upstream)
    # Until register has probed once, the port is held by a listener that answers no TLS;
    # then a real front (rendered from the same config, to the node's worker) takes it.
    with socket.create_server(("127.0.0.1", port)) as holder:
        holder.settimeout(30)
        run = subprocess.Popen([AGENT_PROXY, "register", "-c", str(config), "--wait-front", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            holder.accept()[0].close()
            front = start_haproxy(render("node-haproxy", config, "log_format=raw"), tmp_path, "late-front")
        except BaseException:
            run.kill()
            raise
    try:
        stdout, stderr = run.communicate(timeout=90)
        assert (run.returncode, stderr) == (0, ""), stdout + stderr
        assert stdout == (f"site-a registered with {upstream['url']}; the upstream reached this proxy at {late} "
                          "(features: northbound, southbound, registration, metrics)\n")
        assert registered(upstream) == [("site-a", late)]
    finally:
        run.kill()
        front.stop()
        cli("deregister", "-c", str(config))


@pytest.mark.parametrize(("bind", "probed"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
def test_register_gives_up_on_a_front_that_does_not_answer(node, upstream, tmp_path, bind, probed):
    # The front binds every address: register probes it on loopback. public_url is the
    # node's live front, so a registration despite the failed wait would show.
    port = free_port()
    config = variant(node, tmp_path, **{"front.bind": bind, "front.port": port})
    nothing_registered(node, upstream)
    run = cli("register", "-c", str(config), "--wait-front", "2")
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"agent-proxy: the front did not answer https://{probed}:{port}/_proxy/health within 2 s "
               "(last: Connection refused)\n")
    assert registered(upstream) == []


def test_register_waits_for_a_front_that_reaches_a_worker(node, upstream, tmp_path):
    # A front whose worker is not running answers, but not 200: that is no front to register behind.
    port = free_port()
    config = variant(node, tmp_path, **{"front.port": port, "front.stats_socket": str(tmp_path / "alone.sock"),
                                        "listen.port": free_port(), "public_url": f"https://127.0.0.1:{port}"})
    front = start_haproxy(render("node-haproxy", config, "log_format=raw"), tmp_path, "front-alone")
    try:
        wait_for_port("127.0.0.1", port, proc=front)
        nothing_registered(node, upstream)
        run = cli("register", "-c", str(config), "--wait-front", "2")
    finally:
        front.stop()
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"agent-proxy: the front did not answer https://127.0.0.1:{port}/_proxy/health within 2 s "
               "(last: answered 503)\n")
    assert registered(upstream) == []


@pytest.mark.parametrize("seconds", ["soon", "-1", "nan", "inf", ""])
def test_register_refuses_a_bad_wait(node, seconds):
    run = cli("register", "-c", str(node.config), "--wait-front", seconds)
    assert (run.returncode, run.stdout, run.stderr) == (
        2, "", f"agent-proxy: --wait-front {seconds!r}: expected a number of seconds, 0 or more\n")
