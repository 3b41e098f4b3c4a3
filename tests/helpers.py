"""What the test suites share: ports, real processes, configs.

Processes are started by the test and stopped by PID; every wait is bounded and ends
with a message that says what did not come up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AGENT_PROXY = str(VENV_BIN / "agent-proxy")
SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 15, netns: str | None = None, proc: "Process | None" = None) -> None:
    """Wait until something accepts TCP connections on host:port (inside ``netns`` if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before listening on {host}:{port}:\n{proc.output()}")
        if netns:
            probe = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-c",
                 f"import socket; socket.create_connection(({host!r}, {port}), 0.5).close()"],
                capture_output=True, timeout=10,
            )
            if probe.returncode == 0:
                return
        else:
            try:
                socket.create_connection((host, port), 0.5).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    detail = f":\n{proc.output()}" if proc is not None else ""
    raise TimeoutError(f"nothing listened on {host}:{port}{' in ' + netns if netns else ''} within {timeout} s{detail}")


@dataclass
class Process:
    """A real process the test started; its output goes to a file for the failure message."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict | None = None
    popen: subprocess.Popen = field(init=False)

    def start(self) -> "Process":
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            list(self.argv), stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})}, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def write_config(directory: Path, upstream_url: str, **overrides) -> Path:
    """A worker config in ``directory`` with a known secret and a fresh certificate.

    ``overrides`` are top-level keys merged over the defaults used by the tests.
    """
    from agent_proxy.tlsutil import self_signed

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "psk").write_text(SECRET + "\n")
    os.chmod(directory / "psk", 0o600)
    cert_file, key_file = directory / "proxy.crt", directory / "proxy.key"
    if not cert_file.exists():
        cert, key = self_signed("localhost", ["localhost", "127.0.0.1"])
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        os.chmod(key_file, 0o600)
    data = {
        "proxy_id": "site-a",
        "public_url": "https://127.0.0.1:2002",
        "upstream": {"url": upstream_url, "allow_insecure": upstream_url.startswith("http:"),
                     "connect_timeout": 2, "read_timeout": 5},
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "shared_secret_file": str(directory / "psk"),
        "trusted_proxies": ["127.0.0.1"],
        "networks": {"agents": ["127.0.0.0/8"], "upstream": ["127.0.0.0/8"]},
        "logging": {"level": "info", "format": "json"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = directory / "agent-proxy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_worker(config_path: Path, tmp_path: Path, port: int | None = None, name: str = "worker", netns: str | None = None) -> Process:
    """`agent-proxy serve` as a real process; returns once it accepts connections."""
    config = yaml.safe_load(config_path.read_text())
    port = port or config["listen"]["port"]
    argv = [AGENT_PROXY, "serve", "-c", str(config_path), "--port", str(port)]
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    proc = Process(name, argv, tmp_path / f"{name}-{port}.log").start()
    wait_for_port(config["listen"]["host"], port, netns=netns, proc=proc)
    return proc
