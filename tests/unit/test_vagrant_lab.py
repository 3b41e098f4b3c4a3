"""The Vagrant lab without booting it: the Vagrantfile as Vagrant reads it (every host, or
LAB_HOSTS), the seed each VM's first boot gets, a play for every topology role, and the
scenario's plan for a lab of a few hosts. `make vagrant-demo` boots it (lab/README.md)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading

import pytest
import yaml

from agent_proxy.seed import apply
from agent_proxy.tlsutil import self_signed
from kit import REPO
from lab import scenario, topology
from lab.runner import Lab
from lab.vagrant import VagrantLab

SITE_B_PATH = ["upstream", "internet", "gateway-b", "node-b", "agent-b"]
IMAGE_CONFIG = "proxy_id: appliance\nupstream:\n  url: https://upstream.invalid:3302\nfront:\n  workers: 2\n"


def vagrant_validate(tmp_path, lab_hosts: str | None = None) -> subprocess.CompletedProcess:
    """`vagrant validate -p` (provider settings ignored: no libvirt needed) with its own dotfile folder."""
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"), "VAGRANT_HOME": str(tmp_path / "home")}
    env.pop("LAB_HOSTS", None)
    if lab_hosts is not None:
        env["LAB_HOSTS"] = lab_hosts
    return subprocess.run(["vagrant", "validate", "-p"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def machines(output: str) -> set[str]:
    return set(re.findall(r"^==> (\S+): Ignoring provider config for validation", output, re.M))


def test_the_vagrantfile_defines_every_host_of_the_topology(tmp_path):
    result = vagrant_validate(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert machines(result.stdout) == set(topology.load().hosts)


def test_lab_hosts_defines_only_the_hosts_named(tmp_path):
    result = vagrant_validate(tmp_path, " ".join(SITE_B_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert machines(result.stdout) == set(SITE_B_PATH)


def test_an_unknown_lab_host_is_named_in_one_line(tmp_path):
    result = vagrant_validate(tmp_path, "node-b nowhere")
    assert result.returncode != 0
    assert "LAB_HOSTS: not in lab/topology.yaml: nowhere" in result.stderr
    assert "Traceback" not in result.stderr and ".rb:" not in result.stderr


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The seed.env the Vagrantfile gives each VM (through QEMU fw_cfg)."""
    tmp = tmp_path_factory.mktemp("vagrant")
    result = vagrant_validate(tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "dotfile" / "agent-proxy-lab-seed"


@pytest.mark.parametrize("host", sorted(topology.load().hosts))
def test_every_vm_gets_a_seed_on_which_first_boot_makes_a_valid_config(seeds, tmp_path, host):
    # What first boot does with the seed (agent_proxy.seed.apply), then the config's own check:
    # a seed without the lab's upstream leaves the image's placeholder and first boot fails.
    root = tmp_path / "root"
    config = root / "etc/agent-proxy/agent-proxy.yaml"
    (root / "etc/chrony").mkdir(parents=True)
    (root / "etc/chrony/chrony.conf").write_text("pool 2.debian.pool.ntp.org iburst\n")
    (root / "etc/hosts").write_text("127.0.1.1 agent-proxy\n")
    config.parent.mkdir(parents=True)
    config.write_text(IMAGE_CONFIG)
    apply(seeds / host, config, root / "etc/agent-proxy/firewall/vars.yaml", root)
    data = yaml.safe_load(config.read_text())
    topo = topology.load()
    entry = topo.hosts[host]
    assert data["upstream"]["url"] == f"https://{topo.upstream_address}:{topo.upstream_port}"
    assert (root / "etc/hostname").read_text() == f"{host}\n"
    if entry.role == "proxy-node":
        site = topo.sites[entry.site]
        assert data["proxy_id"] == site.proxy_id
        assert data["public_url"] == f"https://{site.public_address}:{topo.proxy_port}"
        assert data["networks"]["agents"] == [str(topo.networks[site.agent_network].cidr)]
        assert data["front"].get("balancers", []) == [f"{topo.hosts[b].address}/32" for b in site.balancers]


def test_every_topology_role_has_a_play_and_every_play_a_group():
    topo = topology.load()
    plays = yaml.safe_load((REPO / "ansible/playbooks/lab.yml").read_text())
    play_hosts = {play["hosts"] for play in plays}
    groups = {topo.groups[host.role] for host in topo.hosts.values()}
    assert groups <= play_hosts, f"roles without a play: {sorted(groups - play_hosts)}"
    assert play_hosts - groups == {"all"}, f"plays for no topology role: {sorted(play_hosts - groups - {'all'})}"


def test_the_namespace_lab_runs_every_step_of_the_scenario(tmp_path):
    lab = Lab(tmp_path / "work", "unused-")
    assert all(step.needs <= lab.hosts_up for step in scenario.steps(lab))


def test_a_lab_of_one_sites_path_skips_the_steps_of_the_other_site(tmp_path):
    lab = VagrantLab(tmp_path, SITE_B_PATH)
    assert [s.name for s in lab.sites_up] == ["site-b"]
    runs = [step.title for step in scenario.steps(lab) if step.needs <= lab.hosts_up]
    assert runs == ["register site-b: its own gateway, 4.3.3.1:2002",
                    "agent-b (at 10.0.0.2) handshakes through its proxy",
                    "a command for site-b's 10.0.0.2 reaches site B's agent",
                    "control traffic apart: the upstream's paths on port 2004 only, refused to a signed agent on 2002"]
    with_outsider = VagrantLab(tmp_path, SITE_B_PATH + ["outsider"])
    assert "gateway 4.3.3.1:2002 drops a stranger, admits the upstream" in \
        [step.title for step in scenario.steps(with_outsider) if step.needs <= with_outsider.hosts_up]


class LocalVagrantLab(VagrantLab):
    """The Vagrant lab's probes run here instead of on a VM over SSH (the only difference)."""

    def run(self, host, argv, timeout=30, input=None):
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers 404 to a GET and 200 to a POST, with what it was sent."""

    def do_GET(self):
        self.answer(404, {"path": self.path, "authorization": self.headers.get("Authorization")})

    def do_POST(self):
        sent = self.rfile.read(int(self.headers["Content-Length"]))
        self.answer(200, {"body": json.loads(sent), "content_type": self.headers.get("Content-Type")})

    def answer(self, status, fields):
        body = json.dumps(fields).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def echo_server():
    """A plain HTTP Echo server on loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = serve(server)
    yield server.server_address[1]
    server.shutdown()
    thread.join(5)
    server.server_close()


@pytest.fixture
def tls_echo_server(tmp_path):
    """An HTTPS Echo server on loopback with a certificate for 127.0.0.1: (port, its certificate file)."""
    cert, key = self_signed("upstream", ["127.0.0.1"])
    (tmp_path / "echo.crt").write_bytes(cert)
    (tmp_path / "echo.key").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "echo.crt", tmp_path / "echo.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = serve(server)
    yield server.server_address[1], str(tmp_path / "echo.crt")
    server.shutdown()
    thread.join(5)
    server.server_close()


def test_the_vagrant_labs_http_probe_returns_status_and_body_and_sends_the_headers(tmp_path, echo_server):
    lab = LocalVagrantLab(tmp_path, SITE_B_PATH)
    status, body = lab.http("agent-b", "127.0.0.1", echo_server, "GET", "/_proxy/v2/features?x=1",
                            headers={"Authorization": "AgentProxy-HMAC ts=1, sig=ab"})
    assert status == 404
    assert json.loads(body) == {"path": "/_proxy/v2/features?x=1", "authorization": "AgentProxy-HMAC ts=1, sig=ab"}


def test_the_operator_api_call_checks_the_upstreams_certificate_and_sends_the_body(tmp_path, tls_echo_server):
    port, cert = tls_echo_server

    class Lab(LocalVagrantLab):
        upstream_ca_file = cert

    lab = Lab(tmp_path, SITE_B_PATH)
    lab.topology = dataclasses.replace(lab.topology, upstream_port=port)
    status, body = lab.operator("POST", "/operator/v1/commands", {"command": "echo"})
    assert (status, json.loads(body)) == (200, {"body": {"command": "echo"}, "content_type": "application/json"})
    other_ca, _ = self_signed("someone-else", ["127.0.0.1"])
    (tmp_path / "other.crt").write_bytes(other_ca)
    Lab.upstream_ca_file = str(tmp_path / "other.crt")
    with pytest.raises(OSError, match=f"^GET / on the upstream's operator API: upstream -> 127.0.0.1:{port}: SSLCertVerificationError"):
        lab.operator("GET", "/", timeout=5)


def test_the_vagrant_labs_http_probe_tells_a_refused_connection_from_a_silent_one(tmp_path):
    lab = LocalVagrantLab(tmp_path, SITE_B_PATH)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(OSError, match=f"agent-b -> 127.0.0.1:{closed}: ConnectionRefusedError") as refused:
        lab.http("agent-b", "127.0.0.1", closed, "GET", "/", tls=True, timeout=2)
    assert not isinstance(refused.value, socket.timeout)
    # A port that takes the connection and never answers: what a dropped request looks like.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(socket.timeout, match=f"^agent-b -> 127.0.0.1:{port}: no answer within 1 s$"):
            lab.http("agent-b", "127.0.0.1", port, "GET", "/", tls=True, timeout=1)


def test_the_vagrant_demo_names_an_unknown_host_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.vagrant", "--workdir", str(tmp_path), "--hosts", "node-b nowhere"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["vagrant-demo: LAB_HOSTS: not in lab/topology.yaml: nowhere"]
