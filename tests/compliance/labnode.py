"""A single proxy node in a network namespace, built the way an operator builds one, for the
compliance suite to audit (and to break on purpose).

    namespace apcomp-<pid> whose loopback holds 10.1.2.3 (the node) and 8.7.6.5 (the
    upstream, a reference origin with TLS); no link leaves the namespace
    files from `agent-proxy init` in a temporary folder, modes as on a real node:
        config 0640 root:nogroup, key 0600 root, secret 0600 nobody
    2 workers (`agent-proxy serve`) as nobody on 127.0.0.1:8002-8003, their control
    listeners (listen_control) on 127.0.0.1:9002-9003
    HAProxy from `agent-proxy render node-haproxy` on 10.1.2.3:2002, and the upstream's
    control-only port 10.1.2.3:2004; front.mode native (its signing key from
    `render node-haproxy-key`, 0600 root)
    iptables and ip6tables rules from `agent-proxy render firewall-node[6]`

Everything it starts is stopped by PID; the namespace it created is deleted by name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from agent_proxy.tlsutil import self_signed
from kit import AGENT_PROXY, REPO, Process, netns, wait_for_port, write_private

NODE_IP, UPSTREAM_IP = "10.1.2.3", "8.7.6.5"
UPSTREAM_PORT, FRONT_PORT, FIRST_WORKER, WORKERS = 3302, 2002, 8002, 2
CONTROL_PORT, FIRST_CONTROL = 2004, 9002
SERVICE_USER, SERVICE_GROUP = "nobody", "nogroup"


def _run(argv: list[str], **kwargs) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class LabNode:
    def __init__(self) -> None:
        self.namespace = f"apcomp-{os.getpid()}"
        self.root = Path(tempfile.mkdtemp(prefix="apcomp-"))
        self.config_dir = self.root / "etc"
        self.config_path = self.config_dir / "agent-proxy.yaml"
        self.front_config = self.root / "haproxy.cfg"
        self.procs: list[Process] = []
        self.front: Process | None = None

    # -- building

    def up(self) -> "LabNode":
        self.root.chmod(0o755)  # the workers run as nobody and must reach their config
        netns.add(self.namespace)
        for address in (NODE_IP, UPSTREAM_IP):  # local addresses, reached over loopback
            netns.run(["ip", "-n", self.namespace, "addr", "add", f"{address}/32", "dev", "lo"])
        self._write_files()
        self._start_upstream()
        for port in range(FIRST_WORKER, FIRST_WORKER + WORKERS):
            self._start_worker(port)
        (self.front_config).write_text(self._render("node-haproxy", "--set", "log_format=raw"))
        self.start_front()
        self._apply_firewall()
        return self

    def _render(self, template: str, *extra: str) -> str:
        return _run([AGENT_PROXY, "render", template, "-c", str(self.config_path), *extra])

    def _write_files(self) -> None:
        _run([AGENT_PROXY, "init", "--config-dir", str(self.config_dir), "--proxy-id", "site-a",
              "--upstream-url", f"https://{UPSTREAM_IP}:{UPSTREAM_PORT}",
              "--public-url", f"https://{NODE_IP}:{FRONT_PORT}", "--hostname", NODE_IP])
        cert, key = self_signed(UPSTREAM_IP, [UPSTREAM_IP])
        (self.root / "upstream.crt").write_bytes(cert)
        (self.root / "upstream.key").write_bytes(key)
        data = yaml.safe_load(self.config_path.read_text())
        data["upstream"]["ca_file"] = str(self.root / "upstream.crt")
        data["listen"] = {"host": "127.0.0.1", "port": FIRST_WORKER}
        data["listen_control"] = {"host": "127.0.0.1", "port": FIRST_CONTROL}
        data["networks"] = {"agents": ["10.0.0.0/24"], "upstream": [f"{UPSTREAM_IP}/32"]}
        # Native mode: the front relays northbound itself and holds the signing key.
        data["front"] = {"bind": NODE_IP, "port": FRONT_PORT, "control_port": CONTROL_PORT, "workers": WORKERS, "mode": "native",
                         "stats_socket": str(self.root / "haproxy.sock")}
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))  # keeps init's 0640
        shutil.chown(self.config_path, "root", SERVICE_GROUP)
        shutil.chown(self.config_dir / "psk", SERVICE_USER, SERVICE_GROUP)
        write_private(self.config_dir / "psk.haproxy-map", self._render("node-haproxy-key"))

    def _start(self, name: str, argv: list[str], port: int, host: str) -> Process:
        proc = Process(name, argv, self.root / f"{name}.log", netns=self.namespace).start()
        self.procs.append(proc)
        wait_for_port(host, port, proc=proc)
        return proc

    def _start_upstream(self) -> None:
        self._start("upstream", [sys.executable, "-m", "tests.origin", f"{UPSTREAM_IP}:{UPSTREAM_PORT}", "--tls",
                                 str(self.root / "upstream.crt"), str(self.root / "upstream.key")],
                    UPSTREAM_PORT, UPSTREAM_IP)

    def _start_worker(self, port: int, config_path: Path | None = None) -> None:
        self._start(f"worker-{port}", ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_GROUP}",
                                       "--clear-groups", AGENT_PROXY, "serve", "-c", str(config_path or self.config_path),
                                       "--port", str(port)], port, "127.0.0.1")

    def start_front(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.front = self._start("haproxy", [haproxy, "-db", "-f", str(self.front_config)], FRONT_PORT, NODE_IP)

    def _apply_firewall(self) -> None:
        for template, command in (("firewall-node", "iptables-restore"), ("firewall-node6", "ip6tables-restore")):
            rules = self.root / f"{template}.rules"
            rules.write_text(self._render(template))
            netns.ns_run(self.namespace, [command, "--test", str(rules)])
            netns.ns_run(self.namespace, [command, str(rules)])

    # -- auditing

    def audit(self, name: str, *options: str) -> tuple[subprocess.CompletedProcess, Path]:
        """Run the compliance suite against this node, with more pytest ``options``; returns
        the run and its JUnit XML."""
        junit = self.root / f"{name}.xml"
        argv = netns.prefix(self.namespace) + [
            str(Path(sys.executable).parent / "pytest"), "tests/compliance", "--hosts=local://",
            f"--ap-config={self.config_path}", f"--ap-install-dir={Path(sys.prefix)}",
            f"--ap-summary={self.root / (name + '-summary.txt')}", f"--junitxml={junit}",
            "-p", "no:cacheprovider", "-q", *options,
        ]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
        return result, junit

    # -- breaking it on purpose

    def renew_certificate(self, days: int) -> None:
        """A new certificate and key in place (modes kept), valid for ``days``; the front
        serves it from its next start."""
        cert, key = self_signed(NODE_IP, [NODE_IP], days=days)
        (self.config_dir / "tls" / "proxy.key").write_bytes(key)
        (self.config_dir / "tls" / "proxy.crt").write_bytes(cert)

    def loosen_key(self) -> None:
        (self.config_dir / "tls" / "proxy.key").chmod(0o644)

    def open_firewall(self) -> None:
        netns.ns_run(self.namespace, ["iptables", "-P", "INPUT", "ACCEPT"])
        netns.ns_run(self.namespace, ["iptables", "-F", "INPUT"])

    def render_front_as_worker_mode(self) -> None:
        """The front's file rendered as if front.mode were worker (the config still says
        native): served from the front's next start."""
        data = yaml.safe_load(self.config_path.read_text())
        data["front"]["mode"] = "worker"
        other = self.root / "worker-mode.yaml"
        other.write_text(yaml.safe_dump(data, sort_keys=False))
        self.front_config.write_text(_run([AGENT_PROXY, "render", "node-haproxy", "-c", str(other), "--set", "log_format=raw"]))

    def restart_workers_without_control_listener(self) -> None:
        """The workers restarted from a copy of the config without listen_control: they
        serve the upstream's paths on their one listener, so through the client port too."""
        data = yaml.safe_load(self.config_path.read_text())
        del data["listen_control"]
        other = self.root / "no-control.yaml"
        other.write_text(yaml.safe_dump(data, sort_keys=False))
        other.chmod(0o644)
        for proc in [p for p in self.procs if p.name.startswith("worker-")]:
            proc.stop()
            self.procs.remove(proc)
        for port in range(FIRST_WORKER, FIRST_WORKER + WORKERS):
            self._start_worker(port, other)

    def enable_tls10(self) -> None:
        """Let the front's bind line accept TLS 1.0 (and so 1.1), then restart HAProxy."""
        text = self.front_config.read_text()
        bind = re.compile(rf"^(\s*bind\s+\S+:{FRONT_PORT}\s.*\bssl\b.*)$", re.M)
        if not bind.search(text):
            raise RuntimeError(f"no TLS bind line for :{FRONT_PORT} in {self.front_config}")
        self.front_config.write_text(bind.sub(r"\1 ssl-min-ver TLSv1.0 ciphers DEFAULT@SECLEVEL=0", text))
        _run(["haproxy", "-c", "-q", "-f", str(self.front_config)])
        self.front.stop()
        self.procs.remove(self.front)
        self.start_front()

    # -- tearing down

    def down(self) -> None:
        problems = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others, then report
                problems.append(f"{proc.name}: {exc}")
        self.procs.clear()
        netns.delete(self.namespace)
        shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise RuntimeError("; ".join(problems))
