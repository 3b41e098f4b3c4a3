"""The servers under test and the paths through them.

Everything listens on loopback, or inside the two network namespaces that this module
creates for the southbound path (``apbench-<pid>-node`` and ``apbench-<pid>-agent``,
linked by one veth pair, no route anywhere else). Every process is started here and
stopped by PID; the namespaces are deleted by name once their processes are gone.

The origin is nginx serving three static files (200 B, 64 KiB, 100 MiB) and
``POST /upload``, which reads the whole request body and discards it, then answers 200
with a 9-byte body. nginx cannot echo a body by itself; reading and discarding it is the
honest stand-in: every byte is relayed and received, and the answer stays small.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent_proxy import signing
from lab import netns
from tests.helpers import AGENT_PROXY, SECRET, Process, free_port, start_worker, wait_for_port, write_config

from . import procstat

SMALL_BYTES = 200
MEDIUM_BYTES = 64 * 1024
BIG_BYTES = 100 * 1024 * 1024
UPLOAD_ANSWER = "received\n"
NODE_WORKERS = 2
AGENT_IP, NODE_IP, AGENT_PORT = "10.0.0.2", "10.0.0.1", 2003


@dataclass
class BenchPath:
    """One way through to the origin: where wrk aims and which processes do the work."""

    key: str
    title: str
    base_url: str                    # the origin's /small is base_url + "/small"
    relay_pids: list[int]            # the path's own servers (for direct: the origin itself)
    origin_pids: list[int]
    worker_pids: list[int] = field(default_factory=list)
    netns: str | None = None         # wrk and curl run inside this namespace
    signed_prefix: str | None = None  # southbound: the request target starts with this

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, method: str, path: str) -> list[str]:
        """Extra request headers; southbound requests carry a fresh upstream signature."""
        if self.signed_prefix is None:
            return []
        value = signing.authorization(SECRET.encode(), "site-a", method, self.signed_prefix + path)
        return [f"Authorization: {value}"]

    @property
    def prefix(self) -> list[str]:
        return netns.prefix(self.netns) if self.netns else []

    def probe(self, method: str, path: str, body_bytes: int = 0) -> tuple[int, int]:
        """One request with curl: (status, bytes received)."""
        argv = [*self.prefix, "curl", "-sk", "--max-time", "10", "-o", "/dev/null",
                "-w", "%{http_code} %{size_download}", "-X", method]
        for header in self.headers(method, path):
            argv += ["-H", header]
        if body_bytes:
            argv += ["--data-binary", "x" * body_bytes, "-H", "Content-Type: application/octet-stream"]
        done = subprocess.run(argv + [self.url(path)], capture_output=True, text=True, timeout=20)
        status, size = done.stdout.split() if done.stdout.strip() else ("0", "0")
        return int(status), int(size)


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (workers sit on P, P+1, ...)."""
    for _ in range(50):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1")


def write_www(directory: Path, big_bytes: int) -> Path:
    """/small, /medium and /big (``big_bytes``) for the origin and the agent to serve."""
    www = directory / "www"
    www.mkdir(parents=True, exist_ok=True)
    for name, size in (("small", SMALL_BYTES), ("medium", MEDIUM_BYTES), ("big", big_bytes)):
        path = www / name
        if name == "big":
            with open(path, "wb") as handle:
                handle.truncate(size)  # sparse: nothing to write, nginx still sends every byte
        else:
            path.write_bytes((b"0123456789abcdef" * (size // 16 + 1))[:size])
    return www


def nginx_config(directory: Path, www: Path, listen: str) -> Path:
    """The origin's configuration, everything inside ``directory``."""
    text = f"""\
# Origin for the relay benchmark. One worker process: the origin is not what is
# measured, and the other paths need the second core.
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
    keepalive_requests 10000000;
    server {{
        listen {listen} backlog=4096;
        root {www};
        location / {{ }}
        # Reads the whole body, discards it, answers with a short body (nginx cannot echo).
        location = /upload {{
            client_max_body_size 256m;
            client_body_buffer_size 1m;
            return 200 "{UPLOAD_ANSWER.strip()}\\n";
        }}
    }}
}}
"""
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def haproxy_alone_config(directory: Path, port: int, origin_port: int) -> Path:
    """A minimal HTTP-mode HAProxy in front of the origin: the reference relay."""
    text = f"""\
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s
frontend relay
    bind 127.0.0.1:{port}
    default_backend origin
backend origin
    server origin 127.0.0.1:{origin_port}
"""
    path = directory / "haproxy-alone.cfg"
    path.write_text(text)
    return path


class Lab:
    """Starts the servers, hands out paths, and stops everything it started."""

    def __init__(self, directory: Path, big_bytes: int = BIG_BYTES):
        self.dir = directory
        self.stack = contextlib.ExitStack()
        self.big_bytes = big_bytes
        self.www = write_www(directory, big_bytes)
        self.origin_port: int | None = None
        self.origin_pids: list[int] = []

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    # -- processes

    def _start(self, name: str, argv: list[str], host: str, port: int, ns: str | None = None) -> Process:
        full = (netns.prefix(ns) if ns else []) + argv
        proc = Process(name, full, self.dir / f"{name}.log").start()
        self.stack.callback(proc.stop)
        wait_for_port(host, port, timeout=20, netns=ns, proc=proc)
        return proc

    def _worker(self, config: Path, port: int, name: str, ns: str | None = None) -> Process:
        proc = start_worker(config, self.dir, port, name=name, netns=ns)
        self.stack.callback(proc.stop)
        return proc

    def _nginx(self, name: str, listen_host: str, port: int, ns: str | None = None) -> list[int]:
        conf_dir = self.dir / name
        conf_dir.mkdir()
        conf = nginx_config(conf_dir, self.www, f"{listen_host}:{port}")
        proc = self._start(name, ["nginx", "-c", str(conf), "-g", "daemon off;"], listen_host, port, ns)
        return procstat.with_children(proc.pid)

    @staticmethod
    def _render(name: str, config: Path, *sets: str) -> str:
        argv = [AGENT_PROXY, "render", name, "-c", str(config)]
        for item in sets:
            argv += ["--set", item]
        rendered = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if rendered.returncode != 0:
            raise RuntimeError(f"agent-proxy render {name} failed: {rendered.stderr.strip()}")
        return rendered.stdout

    def _node_front(self, config: Path, host: str, port: int, ns: str | None = None) -> list[int]:
        cfg = config.parent / "haproxy-node.cfg"
        cfg.write_text(self._render("node-haproxy", config, "log_format=raw", f"metrics_bind=127.0.0.1:{free_port()}"))
        proc = self._start(f"front-{config.parent.name}", ["haproxy", "-f", str(cfg)], host, port, ns)
        # Master-worker: the CPU is spent in the worker the master forks once it has bound.
        deadline = time.monotonic() + 10
        while len(pids := procstat.with_children(proc.pid)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy master {proc.pid} started no worker within 10 s:\n{proc.output()}")
            time.sleep(0.05)
        return pids

    # -- the paths

    def origin(self) -> BenchPath:
        self.origin_port = free_port()
        self.origin_pids = self._nginx("origin", "127.0.0.1", self.origin_port)
        return BenchPath("direct", "origin directly (nginx)", f"http://127.0.0.1:{self.origin_port}",
                         self.origin_pids, self.origin_pids)

    def haproxy_alone(self) -> BenchPath:
        port = free_port()
        cfg = haproxy_alone_config(self.dir, port, self.origin_port)
        proc = self._start("haproxy-alone", ["haproxy", "-f", str(cfg), "-db"], "127.0.0.1", port)
        return BenchPath("haproxy", "HAProxy alone -> origin", f"http://127.0.0.1:{port}",
                         procstat.with_children(proc.pid), self.origin_pids)

    def worker_config(self, name: str, **overrides) -> Path:
        return write_config(self.dir / name, f"http://127.0.0.1:{self.origin_port}", **overrides)

    def single_worker(self, name: str = "worker", title: str = "one worker -> origin", **overrides) -> BenchPath:
        port = free_port()
        config = self.worker_config(name, listen={"host": "127.0.0.1", "port": port}, **overrides)
        proc = self._worker(config, port, name)
        return BenchPath(name, title, f"http://127.0.0.1:{port}", [proc.pid], self.origin_pids, [proc.pid])

    def unpinned_worker(self) -> BenchPath:
        """The `worker` path with ``limits.pin_cpu: false``: what pinning buys, side by side."""
        return self.single_worker("worker-unpinned", "one worker, not pinned to a core -> origin",
                                  limits={"pin_cpu": False})

    def full_node(self, mode: str = "worker") -> BenchPath:
        """The node front and its workers from one config; ``mode`` is front.mode."""
        key = "node" if mode == "worker" else f"node-{mode}"
        first, front = _free_ports(NODE_WORKERS), free_port()
        config = self.worker_config(
            key, listen={"host": "127.0.0.1", "port": first},
            front={"bind": "127.0.0.1", "port": front, "workers": NODE_WORKERS, "mode": mode,
                   "stats_socket": str(self.dir / key / "haproxy.sock")},
        )
        workers = [self._worker(config, first + i, f"{key}-worker-{i}").pid for i in range(NODE_WORKERS)]
        if mode == "native":
            key_map = config.parent / "psk.haproxy-map"
            key_map.write_text(self._render("node-haproxy-key", config))
            key_map.chmod(0o600)
        haproxy = self._node_front(config, "127.0.0.1", front)
        if mode == "native":
            title = f"full node, native front: TLS front relays northbound -> origin ({NODE_WORKERS} workers idle)"
        else:
            title = f"full node: TLS front + {NODE_WORKERS} workers -> origin"
        return BenchPath(key, title, f"https://127.0.0.1:{front}", haproxy + workers, self.origin_pids, workers)

    def native_node(self) -> BenchPath:
        return self.full_node("native")

    def southbound(self) -> BenchPath:
        """Front, workers and wrk in one namespace; the agent (nginx) in another."""
        tag = f"apbench-{os.getpid()}"
        node_ns, agent_ns = f"{tag}-node", f"{tag}-agent"
        for ns in (node_ns, agent_ns):
            netns.add(ns)
            self.stack.callback(netns.delete, ns)  # runs after the processes inside stopped
        netns.link(node_ns, "apb-node", f"{NODE_IP}/24", agent_ns, "apb-agent", f"{AGENT_IP}/24")
        agent = self._nginx("agent", AGENT_IP, AGENT_PORT, agent_ns)
        first, front = 8002, 2002
        config = write_config(
            self.dir / "south", "http://127.0.0.1:9",
            listen={"host": "127.0.0.1", "port": first},
            front={"bind": "127.0.0.1", "port": front, "workers": NODE_WORKERS,
                   "stats_socket": str(self.dir / "south" / "haproxy.sock")},
            networks={"agents": ["10.0.0.0/24"], "upstream": ["127.0.0.0/8"]},
            agents={"ports": [AGENT_PORT], "tls": False},
        )
        workers = [self._worker(config, first + i, f"south-worker-{i}", node_ns).pid for i in range(NODE_WORKERS)]
        haproxy = self._node_front(config, "127.0.0.1", front, node_ns)
        return BenchPath("southbound", f"southbound: TLS front + {NODE_WORKERS} workers -> agent in a namespace",
                         f"https://127.0.0.1:{front}/_proxy/agents/{AGENT_IP}/{AGENT_PORT}",
                         haproxy + workers, agent, workers, netns=node_ns,
                         signed_prefix=f"/_proxy/agents/{AGENT_IP}/{AGENT_PORT}")
