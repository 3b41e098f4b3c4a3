"""The servers under test and the paths through them.

Everything listens on loopback, or inside the two network namespaces that this module
creates for the southbound path (``apbench-<pid>-node`` and ``apbench-<pid>-agent``,
linked by one veth pair, no route anywhere else). Every process is started here with
the test kit (kit/) and stopped by PID; the namespaces are deleted by name once their
processes are gone.

The origin is nginx serving three static files (200 B, 64 KiB, 100 MiB) and
``POST /upload``, which reads the whole request body and discards it, then answers 200
with a 9-byte body. nginx cannot echo a body by itself; reading and discarding it is the
honest stand-in: every byte is relayed and received, and the answer stays small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent_proxy import config as configuration
from agent_proxy import signing
from kit import SECRET, NodeFront, Process, free_port, netns, start_node, start_worker, wait_for_port, wait_until, write_config

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


def nginx_config(directory: Path, www: Path, listen: str, tls: tuple[Path, Path] | None = None) -> Path:
    """The origin's (or the agents') configuration, everything inside ``directory``;
    ``tls``: (certificate, key) to serve HTTPS with."""
    tls_lines = f"ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n        " if tls else ""
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
        listen {listen}{" ssl" if tls else ""} backlog=4096;
        {tls_lines}root {www};
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
        self.tag = f"apbench-{os.getpid()}"   # the prefix of the namespaces it creates

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    # -- processes

    def _start(self, name: str, argv: list[str], host: str, port: int, ns: str | None = None) -> Process:
        proc = Process(name, argv, self.dir / f"{name}.log", netns=ns).start()
        self.stack.callback(proc.stop)
        wait_for_port(host, port, timeout=20, proc=proc)
        return proc

    def _worker(self, config: Path, port: int, name: str, ns: str | None = None) -> Process:
        proc = start_worker(config, self.dir, port, name=name, netns=ns)
        self.stack.callback(proc.stop)
        return proc

    def nginx(self, name: str, listen_host: str, port: int, ns: str | None = None,
              tls: tuple[Path, Path] | None = None, probe_host: str | None = None) -> list[int]:
        """nginx serving the files on ``listen_host``:``port`` ("*": every address, then
        ``probe_host`` is where it is waited for); its master's and workers' PIDs."""
        conf_dir = self.dir / name
        conf_dir.mkdir()
        conf = nginx_config(conf_dir, self.www, f"{listen_host}:{port}", tls)
        proc = self._start(name, ["nginx", "-c", str(conf), "-g", "daemon off;"], probe_host or listen_host, port, ns)
        return procstat.with_children(proc.pid)

    def node(self, name: str, origin_url: str, **options) -> NodeFront:
        """A node (``NODE_WORKERS`` workers, HAProxy front) from kit.start_node, stopped with the
        lab; the per-source limit and the upstream timeouts are the product's defaults."""
        options.setdefault("max_conn_per_source", None)
        defaults = {f.name: f.default for f in dataclasses.fields(configuration.Upstream)}
        options["upstream"] = {"connect_timeout": defaults["connect_timeout"], "read_timeout": defaults["read_timeout"],
                               **options.get("upstream", {})}
        node = start_node(self.dir / name, origin_url, NODE_WORKERS, name=name, **options)
        self.stack.callback(node.stop)
        return node

    @staticmethod
    def front_pids(node: NodeFront) -> list[int]:
        """HAProxy's master and the worker it forks once it has bound (where the CPU is spent)."""
        def forked() -> list[int] | None:
            pids = procstat.with_children(node.haproxy.pid)
            return pids if len(pids) >= 2 else None

        return wait_until(forked, 10, f"HAProxy master {node.haproxy.pid} starts its worker")

    # -- the paths

    def origin(self) -> BenchPath:
        self.origin_port = free_port()
        self.origin_pids = self.nginx("origin", "127.0.0.1", self.origin_port)
        return BenchPath("direct", "origin directly (nginx)", f"http://127.0.0.1:{self.origin_port}",
                         self.origin_pids, self.origin_pids)

    def haproxy_alone(self, name: str = "haproxy-alone", origin_port: int | None = None) -> BenchPath:
        """HAProxy alone in front of the origin (or of the one on ``origin_port``)."""
        port = free_port()
        directory = self.dir / name
        directory.mkdir()
        cfg = haproxy_alone_config(directory, port, origin_port or self.origin_port)
        proc = self._start(name, ["haproxy", "-f", str(cfg), "-db"], "127.0.0.1", port)
        return BenchPath("haproxy", "HAProxy alone -> origin", f"http://127.0.0.1:{port}",
                         procstat.with_children(proc.pid), self.origin_pids)

    def worker_config(self, name: str, origin_port: int | None = None, **overrides) -> Path:
        return write_config(self.dir / name, f"http://127.0.0.1:{origin_port or self.origin_port}", **overrides)

    def single_worker(self, name: str = "worker", title: str = "one worker -> origin", origin_port: int | None = None,
                      **overrides) -> BenchPath:
        """One worker in front of the origin (or of the one on ``origin_port``)."""
        port = free_port()
        config = self.worker_config(name, origin_port, listen={"host": "127.0.0.1", "port": port}, **overrides)
        proc = self._worker(config, port, name)
        return BenchPath(name, title, f"http://127.0.0.1:{port}", [proc.pid], self.origin_pids, [proc.pid])

    def chunky_origin(self, chunks: int) -> int:
        """bench.chunky answering ``chunks`` one-byte chunks to every request; its port."""
        port = free_port()
        argv = [sys.executable, str(Path(__file__).with_name("chunky.py")), str(port), str(chunks)]
        self._start("chunky", argv, "127.0.0.1", port)
        return port

    def unpinned_worker(self) -> BenchPath:
        """The `worker` path with ``limits.pin_cpu: false``: what pinning buys, side by side."""
        return self.single_worker("worker-unpinned", "one worker, not pinned to a core -> origin",
                                  limits={"pin_cpu": False})

    def full_node(self, mode: str = "worker") -> BenchPath:
        """The node front and its workers from one config; ``mode`` is front.mode."""
        key = "node" if mode == "worker" else f"node-{mode}"
        node = self.node(key, f"http://127.0.0.1:{self.origin_port}", mode=mode)
        workers = node.worker_pids
        if mode == "native":
            title = f"full node, native front: TLS front relays northbound -> origin ({NODE_WORKERS} workers idle)"
        else:
            title = f"full node: TLS front + {NODE_WORKERS} workers -> origin"
        return BenchPath(key, title, node.url, self.front_pids(node) + workers, self.origin_pids, workers)

    def native_node(self) -> BenchPath:
        return self.full_node("native")

    def southbound(self) -> BenchPath:
        """Front, workers and wrk in one namespace; the agent (nginx) in another."""
        node_ns, agent_ns = f"{self.tag}-node", f"{self.tag}-agent"
        for ns in (node_ns, agent_ns):
            netns.add(ns)
            self.stack.callback(netns.delete, ns)  # runs after the processes inside stopped
        netns.link(node_ns, "apb-node", f"{NODE_IP}/24", agent_ns, "apb-agent", f"{AGENT_IP}/24")
        agent = self.nginx("agent", AGENT_IP, AGENT_PORT, agent_ns)
        node = self.node("south", "http://127.0.0.1:9", netns=node_ns, first_port=8002, front_port=2002,
                         networks={"agents": ["10.0.0.0/24"], "upstream": ["127.0.0.0/8"]},
                         agents={"ports": [AGENT_PORT], "tls": False})
        workers = node.worker_pids
        return BenchPath("southbound", f"southbound: TLS front + {NODE_WORKERS} workers -> agent in a namespace",
                         f"{node.url}/_proxy/agents/{AGENT_IP}/{AGENT_PORT}",
                         self.front_pids(node) + workers, agent, workers, netns=node_ns,
                         signed_prefix=f"/_proxy/agents/{AGENT_IP}/{AGENT_PORT}")
