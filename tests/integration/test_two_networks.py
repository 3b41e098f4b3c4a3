"""The headline scenario: two isolated networks, each with an agent at 10.0.0.2, kept apart.

Topology (namespaces named with this test run's pid, removed in teardown):

    upstream ns: reference control plane on 8.7.6.5:3302 (HTTPS, self-signed)
        |  8.7.6.5 <-> 4.3.2.1 (point-to-point)      |  8.7.6.5 <-> 4.3.2.2
    site-a proxy ns: `agent-proxy serve`          site-b proxy ns: `agent-proxy serve`
        on 0.0.0.0:2002, 10.0.0.1/24                  on 0.0.0.0:2002, 10.0.0.1/24
        |                                             |
    site-a agent ns: reference agent 10.0.0.2     site-b agent ns: reference agent 10.0.0.2

The workers speak plain HTTP here (no node-front HAProxy in this test): their public_url
is http://4.3.2.x:2002 and the agents' endpoint is http://10.0.0.1:2002. The hops that are
TLS are the worker's calls to the upstream (verified against its certificate) and the
worker's southbound calls to the agents (agents.tls). No route leads out of the lab.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from agent_proxy.tlsutil import self_signed
from kit import AGENT_PROXY, REPO, SECRET, Process, netns, start_worker, wait_for_port, wait_until, write_config

pytestmark = pytest.mark.netns

UPSTREAM_IP = "8.7.6.5"
SITES = {"site-a": "4.3.2.1", "site-b": "4.3.2.2"}
SECRETS = {"site-a": SECRET, "site-b": "the-secret-of-site-b-0123456789abcdef"}
PYTHONPATH = {"PYTHONPATH": f"{REPO / 'app'}"}


class Lab:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        run = os.getpid()
        self.upstream_ns = f"apt-2n-{run}-up"
        self.proxy_ns = {site: f"apt-2n-{run}-p{site[-1]}" for site in SITES}
        self.agent_ns = {site: f"apt-2n-{run}-a{site[-1]}" for site in SITES}
        self.namespaces = [self.upstream_ns, *self.proxy_ns.values(), *self.agent_ns.values()]
        self.procs: list[Process] = []
        self.workers: dict[str, Process] = {}
        self.agents: dict[str, Process] = {}
        self.configs: dict[str, Path] = {}
        self.registered: dict[str, str] = {}  # what `agent-proxy register` printed
        self.ready_before_upstream = 0

    # -- building

    def build_network(self) -> None:
        for name in self.namespaces:
            netns.add(name)
        for site, address in SITES.items():
            proxy_ns, agent_ns = self.proxy_ns[site], self.agent_ns[site]
            netns.link(proxy_ns, "agents0", "10.0.0.1/24", agent_ns, "eth0", "10.0.0.2/24")
            upstream_if = site.replace("-", "")
            netns.link(proxy_ns, "up0", None, self.upstream_ns, upstream_if, None)
            netns.run(["ip", "-n", proxy_ns, "addr", "add", address, "peer", f"{UPSTREAM_IP}/32", "dev", "up0"])
            netns.run(["ip", "-n", self.upstream_ns, "addr", "add", UPSTREAM_IP, "peer", f"{address}/32", "dev", upstream_if])

    def start_workers(self) -> None:
        for site, address in SITES.items():
            directory = self.tmp / site
            config = write_config(
                directory, f"https://{UPSTREAM_IP}:3302",
                proxy_id=site,
                public_url=f"http://{address}:2002",
                upstream={"ca_file": str(self.tmp / "upstream.crt")},
                listen={"host": "0.0.0.0", "port": 2002},
                networks={"agents": ["10.0.0.0/24"], "upstream": [f"{UPSTREAM_IP}/32"]},
                agents={"ports": [2003], "tls": True, "verify": False},
            )
            (directory / "psk").write_text(SECRETS[site] + "\n")
            self.configs[site] = config
            self.start_worker(site)

    def start_worker(self, site: str) -> None:
        starts = sum(p.name.startswith(f"worker-{site}") for p in self.procs)
        worker = start_worker(self.configs[site], self.tmp / site, name=f"worker-{site}-{starts + 1}", netns=self.proxy_ns[site])
        self.workers[site] = worker
        self.procs.append(worker)

    def start_upstream(self) -> None:
        secret_args = []
        for site, secret in SECRETS.items():
            (self.tmp / f"{site}.psk").write_text(secret + "\n")
            secret_args += ["--proxy", f"{site}={self.tmp / f'{site}.psk'}"]
        proc = Process("upstream", [
            sys.executable, "-m", "agent_proxy.reference.upstream", "--listen", "0.0.0.0:3302",
            "--cert", str(self.tmp / "upstream.crt"), "--key", str(self.tmp / "upstream.key"),
            "--allow-token-override", *secret_args,
        ], self.tmp / "upstream.log", env=PYTHONPATH, netns=self.upstream_ns).start()
        self.procs.append(proc)
        wait_for_port("127.0.0.1", 3302, proc=proc)

    def start_agents(self) -> None:
        for site in SITES:
            proc = Process(f"agent-{site}", [
                sys.executable, "-m", "agent_proxy.reference.agent", "--endpoint", "http://10.0.0.1:2002",
                "--listen", "10.0.0.2:2003", "--instance-id", f"vm-{site}",
                "--checkin-interval", "1", "--max-backoff", "2",
            ], self.tmp / f"agent-{site}.log", env=PYTHONPATH, netns=self.agent_ns[site]).start()
            self.procs.append(proc)
            self.agents[site] = proc

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for name in self.namespaces:
            netns.delete(name)

    # -- looking

    def operator(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """A call to the control plane's operator API, from inside its namespace (loopback)."""

        def request():
            context = ssl.create_default_context(cafile=str(self.tmp / "upstream.crt"))
            conn = http.client.HTTPSConnection("127.0.0.1", 3302, context=context, timeout=20)
            try:
                conn.request(method, path, body=json.dumps(body) if body is not None else None,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, json.loads(response.read() or b"null")
            finally:
                conn.close()

        return netns.call_in(self.upstream_ns, request, timeout=30)

    def agent_records(self, site: str | None = None) -> list[dict]:
        status, agents = self.operator("GET", "/operator/v1/agents")
        assert status == 200
        return [a for a in agents if site is None or a["proxy_id"] == site]

    def ready(self, site: str) -> int:
        out = netns.ns_run(self.proxy_ns[site], [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://127.0.0.1:2002/_proxy/ready",
        ], check=False).stdout
        return int(out or 0)

    def events(self, site: str, event: str) -> list[dict]:
        """The events of one kind in the log of the agent of ``site``."""
        lines = self.agents[site].output().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == event]

    def command(self, site: str, command: str, **extra) -> dict:
        status, answer = self.operator("POST", "/operator/v1/commands", {
            "proxy_id": site, "agent_ip": "10.0.0.2", "command": command, **extra,
        })
        assert status == 200, answer
        return answer


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    lab = Lab(tmp_path_factory.mktemp("two-networks"))
    try:
        lab.build_network()
        # Workers first: until the upstream has answered them, they are not ready.
        cert, key = self_signed(UPSTREAM_IP, [UPSTREAM_IP, "127.0.0.1"])
        (lab.tmp / "upstream.crt").write_bytes(cert)
        (lab.tmp / "upstream.key").write_bytes(key)
        lab.start_workers()
        lab.ready_before_upstream = lab.ready("site-a")
        lab.start_upstream()
        for site in SITES:
            wait_until(lambda: lab.ready(site) == 200, 10, f"{site} ready")
            result = subprocess.run(netns.prefix(lab.proxy_ns[site]) + [AGENT_PROXY, "register", "-c", str(lab.configs[site])],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
            lab.registered[site] = result.stdout.strip()
        lab.start_agents()
        for site in SITES:
            wait_until(lambda: any(a["checkins"] for a in lab.agent_records(site)), 15, f"agent of {site} checked in")
        yield lab
    finally:
        lab.teardown()


def test_proxies_become_ready_when_the_upstream_answers_and_register(lab):
    assert lab.ready_before_upstream == 503
    assert all(lab.ready(site) == 200 for site in SITES)
    for site, address in SITES.items():
        assert lab.registered[site].startswith(f"{site} registered with https://{UPSTREAM_IP}:3302; "
                                               f"the upstream reached this proxy at http://{address}:2002")
    status, proxies = lab.operator("GET", "/operator/v1/proxies")
    assert [(p["proxy_id"], p["url"]) for p in proxies] == [(s, f"http://{a}:2002") for s, a in SITES.items()]


def test_two_agents_at_the_same_ip_are_two_records(lab):
    records = lab.agent_records()
    assert [(a["proxy_id"], a["ip"], a["instance_id"]) for a in records] == [
        ("site-a", "10.0.0.2", "vm-site-a"), ("site-b", "10.0.0.2", "vm-site-b"),
    ]
    assert all(a["reported_ip"] == "10.0.0.2" for a in records)


def test_a_command_reaches_only_the_agent_behind_its_proxy(lab):
    before_b = len(lab.events("site-b", "command"))
    answer = lab.command("site-a", "echo", args={"say": "hello a"})
    assert answer["agent_status"] == 200
    assert answer["agent_body"] == {"instance_id": "vm-site-a", "command": "echo", "result": {"say": "hello a"}}
    assert len(lab.events("site-b", "command")) == before_b

    report = lab.command("site-b", "report")["agent_body"]["result"]
    assert report["instance_id"] == "vm-site-b"
    assert report["commands_executed"] == before_b + 1  # this report only: site-a's echo never came here


def test_a_badly_signed_command_is_rejected_by_the_agent(lab):
    rejected_before = len(lab.events("site-a", "command-rejected"))
    answer = lab.command("site-a", "echo", args="x", token_override="not-the-token-of-this-agent-0123")
    assert answer["agent_status"] == 401
    assert answer["agent_body"]["description"] == "signature does not match"
    assert answer["proxy_error"] is None  # the agent refused it, not the proxy
    wait_until(lambda: len(lab.events("site-a", "command-rejected")) > rejected_before, 5, "the agent logged the rejection")


def test_restarting_a_proxy_changes_nothing_for_its_agent(lab):
    before = lab.agent_records("site-a")
    assert len(before) == 1
    backoffs = len(lab.events("site-a", "backoff"))
    lab.workers["site-a"].stop()
    wait_until(lambda: len(lab.events("site-a", "backoff")) > backoffs, 10, "the agent noticed the proxy was gone")
    lab.start_worker("site-a")
    checkins = before[0]["checkins"]
    after = wait_until(lambda: [a for a in lab.agent_records("site-a") if a["checkins"] >= checkins + 2], 15,
                       "the agent checked in again through the restarted proxy")
    assert len(lab.agent_records("site-a")) == 1
    assert after[0]["handshakes"] == before[0]["handshakes"] == 1
    # Still reachable southbound through the new worker process.
    assert lab.command("site-a", "report")["agent_body"]["result"]["instance_id"] == "vm-site-a"
