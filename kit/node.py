"""A node as on an appliance, from one config: real workers behind a real HAProxy front
rendered from the template; optionally inside a network namespace.

On loopback, addresses other than 127.0.0.1 play the parts of a balancer (127.0.0.2) and
of agents (127.0.0.3 and up): Linux routes all of 127/8 to lo, so a client socket bound
to one of them is seen from it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from .config import AGENT_PROXY, PYTHON, SECRET, merged, write_config
from .files import write_private
from .ports import free_port, free_ports
from .process import Process, ProcessError
from .wait import wait_for_port, wait_until

HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"
BALANCER, AGENT, LIMITED_AGENT = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MAX_CONN_PER_SOURCE = 40   # start_node's front.max_conn_per_source: small enough for a test to reach


def start_worker(config_path: Path, directory: Path, port: int | None = None, name: str = "worker",
                 netns: str | None = None) -> Process:
    """`agent-proxy serve` (on ``port``, default listen.port); returns once it accepts connections."""
    config = yaml.safe_load(config_path.read_text())
    port = port or config["listen"]["port"]
    proc = Process(name, [AGENT_PROXY, "serve", "-c", str(config_path), "--port", str(port)],
                   directory / f"{name}-{port}.log", netns=netns).start()
    wait_for_port(config["listen"]["host"], port, proc=proc)
    return proc


def render(name: str, config: Path, *variables: str) -> str:
    """`agent-proxy render NAME`; each variable is key=value (--set) or a file (--vars)."""
    argv = [AGENT_PROXY, "render", name, "-c", str(config)]
    for item in variables:
        argv += ["--set", item] if "=" in item else ["--vars", item]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ProcessError(f"agent-proxy render {name} failed: {done.stderr.strip()}")
    return done.stdout


def start_haproxy(config_text: str, directory: Path, name: str, netns: str | None = None) -> Process:
    """HAProxy on ``config_text`` (checked with -c first); does not wait for its listeners."""
    path = directory / f"{name}.cfg"
    path.write_text(config_text)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise ProcessError(f"haproxy -c -f {path}: {check.stdout}{check.stderr}")
    return Process(name, [HAPROXY, "-f", str(path)], directory / f"{name}.log", netns=netns).start()


def stats_command(socket_path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def stat_rows(socket_path: str, proxy: str) -> dict[str, dict[str, str]]:
    """`show stat` rows of one proxy by name: FRONTEND or BACKEND, and each server's."""
    text = stats_command(socket_path, "show stat").lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == proxy}


def server_stats(socket_path: str, backend: str) -> dict[str, dict[str, str]]:
    """`show stat` rows of ``backend``'s servers by name (status, scur, stot, ...)."""
    rows = stat_rows(socket_path, backend)
    return {name: row for name, row in rows.items() if name not in ("FRONTEND", "BACKEND")}


def all_up(socket_path: str, backend: str) -> bool:
    try:
        return all(row["status"] == "UP" for row in server_stats(socket_path, backend).values())
    except OSError:
        return False


def start_upstream(directory: Path, *extra: str, secret: str = SECRET) -> tuple[Process, str, str]:
    """The reference control plane on a free loopback port, HTTPS with a self-signed
    certificate, holding ``secret`` for site-a; ``extra`` are more of its options.
    Returns the process, its URL and its certificate (the CA file a proxy trusts it with)."""
    port = free_port()
    write_private(directory / "site-a.psk", secret + "\n")
    proc = Process("upstream", [
        PYTHON, "-m", "agent_proxy.reference.upstream", "--listen", f"127.0.0.1:{port}",
        "--self-signed", "127.0.0.1", "--write-cert", str(directory / "upstream.crt"),
        "--proxy", f"site-a={directory / 'site-a.psk'}", *extra,
    ], directory / "upstream.log").start()
    wait_for_port("127.0.0.1", port, proc=proc)
    return proc, f"https://127.0.0.1:{port}", str(directory / "upstream.crt")


def start_origin(directory: Path) -> tuple[Process, str]:
    """The scripted test origin (`python -m tests.origin`) on a free loopback port, and its URL."""
    port = free_port()
    proc = Process("origin", [PYTHON, "-m", "tests.origin", f"127.0.0.1:{port}"], directory / "origin.log").start()
    wait_for_port("127.0.0.1", port, proc=proc)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class NodeFront:
    directory: Path
    config: Path
    port: int
    stats_socket: str
    cert: Path
    haproxy: Process | None
    workers: dict[int, Process] = field(default_factory=dict)
    netns: str | None = None
    host: str = "127.0.0.1"
    mode: str = "worker"   # front.mode
    metrics_port: int = 0  # HAProxy's Prometheus exporter (native mode)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self.workers.values()]

    def start_worker(self, port: int) -> None:
        self.workers[port] = start_worker(self.config, self.directory, port, name="worker", netns=self.netns)

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for proc in self.workers.values():
            proc.stop()


def start_node(directory: Path, origin_url: str, workers: int, balancers: list[str] = (), name: str = "node",
               netns: str | None = None, first_port: int | None = None, front_port: int | None = None,
               max_conn_per_source: int | None = MAX_CONN_PER_SOURCE, render_vars: list[str] = (),
               mode: str = "worker", **overrides) -> NodeFront:
    """Workers and their HAProxy front from one config (``overrides`` laid over the
    defaults), as on an appliance; returns once all workers are UP in HAProxy.

    Inside ``netns`` the ports must be given (free ports are looked up on the root
    namespace's loopback). ``max_conn_per_source`` None keeps the product's default.
    ``render_vars`` are the template's extra variables (key=value, `agent-proxy render --set`).
    ``mode`` is front.mode; in native mode the front's signing key map is written beside
    the secret, as the role and first boot do.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if netns and not (first_port and front_port):
        raise ValueError("a node in a namespace needs first_port and front_port")
    first_port = first_port or free_ports(workers)[0]
    front_port = front_port or free_port()
    stats_socket = str(directory / "haproxy.sock")
    front = {"bind": "127.0.0.1", "port": front_port, "workers": workers, "balancers": list(balancers),
             "stats_socket": stats_socket, "mode": mode}
    if max_conn_per_source is not None:
        front["max_conn_per_source"] = max_conn_per_source
    config = write_config(directory, origin_url, **merged({
        "listen": {"host": "127.0.0.1", "port": first_port},
        "upstream": {"read_timeout": 10},
        "front": front,
    }, overrides))
    bind = yaml.safe_load(config.read_text())["front"]["bind"]
    node = NodeFront(directory, config, front_port, stats_socket, directory / "proxy.crt", haproxy=None, netns=netns,
                     host="127.0.0.1" if bind == "0.0.0.0" else bind, mode=mode)
    try:
        for port in range(first_port, first_port + workers):
            node.start_worker(port)
        if mode == "native":
            write_private(directory / "psk.haproxy-map", render("node-haproxy-key", config))
        node.metrics_port = free_port()
        text = render("node-haproxy", config, "log_format=raw", f"metrics_bind=127.0.0.1:{node.metrics_port}",
                      *render_vars)
        node.haproxy = start_haproxy(text, directory, f"{name}-haproxy", netns=netns)
        wait_for_port(node.host, front_port, proc=node.haproxy)
        wait_until(lambda: all_up(stats_socket, "workers"), 10, f"{name}: workers UP in HAProxy")
    except BaseException:
        node.stop()
        raise
    return node


@contextlib.contextmanager
def node_with_origin(tmp_path_factory, workers: int = 2, balancers: list[str] = (), **overrides) -> Iterator[NodeFront]:
    """A test origin and a node (``start_node``) relaying to it; both stopped at the end."""
    origin, url = start_origin(tmp_path_factory.mktemp("origin"))
    try:
        node = start_node(tmp_path_factory.mktemp("node"), url, workers=workers, balancers=list(balancers), **overrides)
        try:
            yield node
        finally:
            node.stop()
    finally:
        origin.stop()
