"""`python -m bench --scale`: how a node's cost grows with the work (bench/README.md, "Scale").

Three measurements, each bounded in count and time, on loopback and inside two network
namespaces this module creates (``apbench-<pid>-scale`` and ``apbench-<pid>-agents``,
one veth pair between them, no route anywhere else):

1. the knee: 200-byte GETs through a full node at 1 ... 1,024 connections;
2. idle agents held open: TLS keep-alive connections to the same node's front, held
   while a 32-connection load runs; the memory they cost the front and the workers;
3. many distinct agents southbound: one signed call to each of many agent addresses
   (one nginx listening for all of them, TLS), through a node inside a namespace.
"""

from __future__ import annotations

import http.client
import ipaddress
import resource
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from agent_proxy import signing
from agent_proxy.tlsutil import self_signed
from kit import SECRET, NodeFront, netns, server_stats, stat_rows

from . import load, procstat
from .load import Workload
from .paths import SMALL_BYTES, Lab
from .run import log


@dataclass(frozen=True)
class Size:
    """How much of each measurement a run does."""

    curve: tuple[int, ...]        # connections at each point of the knee
    seconds: float                # per wrk run
    idle: int                     # idle connections held
    agents: int                   # distinct agent addresses called once each
    warm_agents: int              # called first (not counted): the workers' caches reach their steady size


FULL = Size(curve=(1, 8, 32, 128, 512, 1024), seconds=5, idle=10_000, agents=20_000, warm_agents=512)
SMOKE = Size(curve=(1, 8), seconds=1, idle=100, agents=100, warm_agents=16)
LOAD_CONNECTIONS = 32        # the load that runs while the idle connections are held
CLIENT_THREADS = 32          # the southbound client's threads (each one keep-alive connection to the front)
# Before the workers' descriptors are counted, after the warm-up and after the calls alike:
# the front's idle connections to the workers, too, are then in the same state.
SETTLE_SECONDS = 3
OPENERS = 16                 # threads opening the idle connections
# The scale node's front: the client connections it accepts (front.max_connections; the
# global maxconn is 64 more), and how long it keeps an idle client connection (the
# template's default 10 s would close the first idle connections before the last ones are
# open). HAProxy asks for 2 x maxconn + ~31 descriptors (a client and a server side for
# every connection) and by default refuses to start without them; an idle client holds no
# connection to a worker, so ~1 per connection is what these use: strict_limits=false lets
# HAProxy start with what the machine allows (a warning in its log).
FRONT_MAX_CONNECTIONS = 12_000
HOLD_TIMEOUT = "300s"
FRONT_RENDER_VARS = ["strict_limits=false", f"client_idle_timeout={HOLD_TIMEOUT}"]
AGENT_PORT = 2003
AGENT_NETWORK = ipaddress.ip_network("10.64.0.0/16")
NODE_LINK, AGENTS_LINK = "192.168.254.1/30", "192.168.254.2/30"
TARGETS = {
    "idle_connections": "held = asked with 0 errors, p99 of the load < 50 ms, < 40 KiB per idle connection",
    "southbound_agents": "0 errors, worker RSS growth < 10 MiB, worker descriptors back to the baseline",
    "connections_curve": "at 1,024 connections >= 80% of the best rate, 0 errors",
}


def raise_descriptor_limit(needed: int) -> tuple[int, int]:
    """RLIMIT_NOFILE of this process (and so of every server and client it starts) up to
    its hard limit; returns the limit it had. Fails when the hard limit is below ``needed``."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"--scale needs {needed:,} file descriptors; the hard limit is {hard:,} "
                         f"(raise it: ulimit -Hn {needed}, or LimitNOFILE= for a service)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return before


def agent_connections(pids: list[int]) -> int:
    """The processes' TCP sockets whose far end is an agent (AGENT_NETWORK, AGENT_PORT)."""
    return procstat.connections_to(pids, AGENT_NETWORK, AGENT_PORT)


def summary(result: dict) -> dict:
    """A wrk run's rate, latency and errors (with wrk's kinds of error, for the JSON)."""
    kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return {"rps": round(result["rps"], 1), "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "errors": result["errors"], "requests": result["requests"],
            "error_kinds": {k: result[k] for k in kinds if result[k]}}


# -- 1 and 2: the knee and idle connections, on one node on loopback


def front_counts(node: NodeFront) -> dict[str, int]:
    """Counters of the node front: 5xx it sent to clients, 5xx the workers answered, times a
    worker was marked DOWN by its health check."""
    front = stat_rows(node.stats_socket, "agent_proxy")["FRONTEND"]
    servers = server_stats(node.stats_socket, "workers").values()
    return {"5xx_to_clients": int(front["hrsp_5xx"] or 0),
            "5xx_from_workers": sum(int(row["hrsp_5xx"] or 0) for row in servers),
            "workers_marked_down": sum(int(row["chkdown"] or 0) for row in servers)}


def connections_curve(node: NodeFront, lua: dict[int, Path], size: Size) -> list[dict]:
    points = []
    for connections in size.curve:
        workload = Workload(f"get-200B-c{connections}", "GET", "/small", connections)
        before = front_counts(node)
        result = load.run(node.url + "/small", workload, lua[connections], size.seconds)
        after = front_counts(node)
        point = {"connections": connections, **summary(result),
                 "front": {key: after[key] - before[key] for key in after}}
        points.append(point)
        log(f"curve: {connections:5} connections {point['rps']:9,.0f} req/s p50 {point['p50_ms']:7.2f} ms "
            f"p99 {point['p99_ms']:7.2f} ms" + (f" ERRORS {point['error_kinds']} {point['front']}" if point["errors"] else ""))
    best = max(p["rps"] for p in points)
    for point in points:
        point["share_of_best"] = point["rps"] / best if best else None
    return points


def open_idle(host: str, port: int, count: int) -> tuple[list[http.client.HTTPSConnection], list[str]]:
    """``count`` TLS connections that each made one request (GET /_proxy/health, as an
    agent's first check-in) and stay open, idle; and why the others failed."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opened: list[http.client.HTTPSConnection] = []
    failed: list[str] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
        try:
            connection.request("GET", "/_proxy/health")
            answer = connection.getresponse()
            answer.read()
            problem = None if answer.status == 200 else f"status {answer.status}"
        except (OSError, http.client.HTTPException) as exc:
            problem = repr(exc)
        with lock:
            if problem:
                failed.append(problem)
                connection.close()
            else:
                opened.append(connection)

    with ThreadPoolExecutor(OPENERS) as pool:
        list(pool.map(one, range(count)))
    return opened, failed


def still_open(connection: http.client.HTTPSConnection) -> bool:
    """The server has not closed this idle connection (nothing to read, no EOF)."""
    sock = connection.sock
    sock.setblocking(False)
    try:
        return bool(sock.recv(1))   # anything read here would be unasked-for: counted as open
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def idle_connections(node: NodeFront, lua: Path, size: Size) -> dict:
    front, workers = Lab.front_pids(node), node.worker_pids
    workload = Workload(f"get-200B-c{LOAD_CONNECTIONS}", "GET", "/small", LOAD_CONNECTIONS)
    without = load.run(node.url + "/small", workload, lua, size.seconds)
    baseline = procstat.rss_kib(front + workers)
    started = time.monotonic()
    opened, failed = open_idle("127.0.0.1", node.port, size.idle)
    took = time.monotonic() - started
    log(f"idle: {len(opened):,} connections open in {took:.1f} s ({len(failed)} failed)")
    try:
        held_load = load.run(node.url + "/small", workload, lua, size.seconds)
        with_idle = procstat.rss_kib(front + workers)
        held = sum(still_open(c) for c in opened)
    finally:
        for connection in opened:
            connection.close()
    result = {
        "asked": size.idle, "held": held, "errors": len(failed) + len(opened) - held + held_load["errors"],
        "open_failures": failed[:5], "open_seconds": round(took, 1),
        "load": {"connections": LOAD_CONNECTIONS, **summary(held_load)},
        "load_without_idle": {"connections": LOAD_CONNECTIONS, **summary(without)},
        "p99_ms": held_load["p99_us"] / 1000,
        "rss_kib_without_idle": baseline, "rss_kib_with_idle": with_idle,
        "rss_kib_per_connection": (with_idle - baseline) / held if held else None,
    }
    log(f"idle: {held:,} held, load p99 {result['p99_ms']:.2f} ms (without idle {summary(without)['p99_ms']:.2f}), "
        f"{result['rss_kib_per_connection'] or 0:.1f} KiB per idle connection, errors {result['errors']}")
    return result


# -- 3: many distinct agents southbound, through a node in a namespace


def agent_addresses(count: int) -> list[str]:
    hosts = AGENT_NETWORK.hosts()
    return [str(next(hosts)) for _ in range(count)]


def add_addresses(namespace: str, device: str, addresses: list[str], directory: Path) -> None:
    """Every address on ``device`` in one `ip -batch` run."""
    batch = directory / "agent-addresses.batch"
    batch.write_text("".join(f"address add {a}/32 dev {device}\n" for a in addresses))
    netns.ns_run(namespace, ["ip", "-batch", str(batch)], timeout=300)


def call_agents(namespace: str, port: int, addresses: list[str]) -> tuple[int, list[str]]:
    """One signed GET /small to each address through the front on 127.0.0.1:``port`` in
    ``namespace``, from CLIENT_THREADS threads (each one keep-alive connection); returns
    the calls that answered 200 with the whole body, and why the others failed."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    ok, failed, lock = [0], [], threading.Lock()
    shares = [addresses[i::CLIENT_THREADS] for i in range(CLIENT_THREADS)]

    def client(share: list[str]) -> None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        for address in share:
            target = f"/_proxy/agents/{address}/{AGENT_PORT}/small"
            headers = {"Authorization": signing.authorization(SECRET.encode(), "site-a", "GET", target)}
            try:
                connection.request("GET", target, headers=headers)
                answer = connection.getresponse()
                body = answer.read()
                problem = None if answer.status == 200 and len(body) == SMALL_BYTES else \
                    f"{address}: status {answer.status} {answer.getheader('X-Agent-Proxy-Error')} {body[:100]!r}"
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{address}: {exc!r}"
                connection.close()   # http.client reconnects on the next request
            with lock:
                if problem:
                    failed.append(problem)
                else:
                    ok[0] += 1

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(lambda share: netns.call_in(namespace, client, share, timeout=900), shares))
    return ok[0], failed


def southbound_agents(lab: Lab, size: Size) -> dict:
    tag = lab.tag
    node_ns, agents_ns = f"{tag}-scale", f"{tag}-agents"
    for ns in (node_ns, agents_ns):
        netns.add(ns)
        lab.stack.callback(netns.delete, ns)  # runs after the processes inside stopped
    netns.link(node_ns, "apbs-node", NODE_LINK, agents_ns, "apbs-agents", AGENTS_LINK)
    netns.route(node_ns, str(AGENT_NETWORK), AGENTS_LINK.split("/")[0])
    addresses = agent_addresses(size.warm_agents + size.agents)
    warm, measured = addresses[:size.warm_agents], addresses[size.warm_agents:]
    started = time.monotonic()
    add_addresses(agents_ns, "apbs-agents", addresses, lab.dir)
    log(f"southbound: {len(addresses):,} agent addresses in {agents_ns} in {time.monotonic() - started:.1f} s")
    cert, key = lab.dir / "agent.crt", lab.dir / "agent.key"
    cert_pem, key_pem = self_signed("agents", [addresses[0]])
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    lab.nginx("agents", "*", AGENT_PORT, agents_ns, tls=(cert, key), probe_host=addresses[0])
    node = lab.node("scale-south", "http://127.0.0.1:9", netns=node_ns, first_port=8002, front_port=2002,
                    networks={"agents": [str(AGENT_NETWORK)], "upstream": ["127.0.0.0/8"]},
                    agents={"ports": [AGENT_PORT], "tls": True, "verify": False})
    workers = node.worker_pids
    servers = Lab.front_pids(node) + workers
    ok, failed = call_agents(node_ns, node.port, warm)
    if failed:
        raise RuntimeError(f"southbound warm-up: {len(failed)} of {len(warm)} calls failed, e.g. {failed[:3]}")
    time.sleep(SETTLE_SECONDS)
    worker_ports = list(node.workers)
    rss_before, fds_before, cpu_before = procstat.rss_kib(workers), procstat.descriptors(workers), procstat.cpu_seconds(servers)
    agents_before, front_before = agent_connections(workers), procstat.connections_on(workers, worker_ports)
    started = time.monotonic()
    ok, failed = call_agents(node_ns, node.port, measured)
    seconds = time.monotonic() - started
    cpu = procstat.cpu_seconds(servers) - cpu_before
    time.sleep(SETTLE_SECONDS)
    rss_after, fds_after = procstat.rss_kib(workers), procstat.descriptors(workers)
    agents_after, front_after = agent_connections(workers), procstat.connections_on(workers, worker_ports)
    result = {
        "agents": len(measured), "ok": ok, "errors": len(failed), "failures": failed[:5],
        "seconds": round(seconds, 1), "requests_per_s": len(measured) / seconds,
        "cpu_us_per_request": cpu / max(1, len(measured)) * 1e6,
        "rss_before_mib": rss_before / 1024, "rss_after_mib": rss_after / 1024,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
        "fds_before": fds_before, "fds_after": fds_after,
        # The front's pooled keep-alive connections to the workers (at most pool-max-conn,
        # their number set by the front's own timers) are counted apart: what is judged is
        # every other descriptor, those that distinct agents could leave behind.
        "front_connections_before": front_before, "front_connections_after": front_after,
        "fds_growth": (fds_after - front_after) - (fds_before - front_before),
        "agent_connections_before": agents_before, "agent_connections_after": agents_after,
        "warm_agents": len(warm), "client_threads": CLIENT_THREADS,
    }
    log(f"southbound: {ok:,}/{len(measured):,} agents in {seconds:.1f} s ({result['requests_per_s']:,.0f}/s, "
        f"{result['cpu_us_per_request']:.0f} µs/req), worker RSS +{result['rss_growth_mib']:.1f} MiB, "
        f"descriptors {fds_before} -> {fds_after} (to agents {agents_before} -> {agents_after}, "
        f"from the front {front_before} -> {front_after})")
    return result


# -- the run


def verdicts(scale: dict) -> dict:
    """Each target of TARGETS: met or not (None when not measured)."""
    idle, south, curve = scale.get("idle_connections"), scale.get("southbound_agents"), scale.get("connections_curve")
    out = {}
    if idle:
        out["idle_connections"] = (idle["held"] == idle["asked"] and idle["errors"] == 0 and idle["p99_ms"] < 50
                                   and (idle["rss_kib_per_connection"] or 0) < 40)
    if south:
        out["southbound_agents"] = south["errors"] == 0 and south["rss_growth_mib"] < 10 and south["fds_growth"] <= 0
    if curve:
        last = curve[-1]
        out["connections_curve"] = last["share_of_best"] is not None and last["share_of_best"] >= 0.8 and last["errors"] == 0
    return out


def run(lab: Lab, size: Size) -> dict:
    """The three measurements; the ``scale`` part of the results."""
    before = raise_descriptor_limit(size.idle + max(size.curve) + 1024)
    if lab.origin_port is None:
        lab.origin()
    scale: dict = {"size": asdict(size), "targets": TARGETS, "front_max_connections": FRONT_MAX_CONNECTIONS,
                   "front_idle_timeout": HOLD_TIMEOUT, "nofile_before": list(before),
                   "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}
    node = lab.node("scale", f"http://127.0.0.1:{lab.origin_port}", max_conn_per_source=0,
                    front={"max_connections": FRONT_MAX_CONNECTIONS}, render_vars=FRONT_RENDER_VARS)
    lua = {c: load.script(Workload(f"get-200B-c{c}", "GET", "/small", c), lab.dir)
           for c in {*size.curve, LOAD_CONNECTIONS}}
    load.run(node.url + "/small", Workload("warm", "GET", "/small", LOAD_CONNECTIONS), lua[LOAD_CONNECTIONS], 1)
    scale["connections_curve"] = connections_curve(node, lua, size)
    scale["idle_connections"] = idle_connections(node, lua[LOAD_CONNECTIONS], size)
    scale["southbound_agents"] = southbound_agents(lab, size)
    scale["met"] = verdicts(scale) if size == FULL else {}   # the targets are for the full size
    return scale
