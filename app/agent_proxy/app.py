"""The worker's WSGI application: ``create_app(config, secret)``.

Three kinds of traffic meet here:

* northbound: an agent calls the proxy exactly as it would call the upstream; everything
  outside ``/_proxy/`` from a source in ``networks.agents`` is relayed to ``upstream.url``
  with the proxy's identity and signature stamped on it (a sink);
* southbound: the upstream calls ``/_proxy/agents/{ip}/{port}/{path}``, signed, and the
  proxy relays it to that agent (a sink);
* the proxy's own endpoints under ``/_proxy/`` (resources).

Source and signature checks are middleware; typed errors become JSON answers through an
error handler. The access log, metrics and the in-flight count sit in a thin WSGI layer
around Falcon, because only there is the last byte of a streamed answer seen.
"""

from __future__ import annotations

import enum
import functools
import io
import ipaddress
import itertools
import json
import logging
import os
import re
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import urlsplit

import falcon
from waitress.channel import ClientDisconnected

from . import __version__, features, logs, relay, signing, targets, tlsutil
from .config import Config
from .errors import ERROR_HEADER, ProxyError, handle_proxy_error, serialize_falcon_error, wsgi_answer
from .logs import AccessLog, LineWriter
from .metrics import Metrics, scrape_node
from .overload import rejecting

log = logging.getLogger("agent_proxy")

# Headers an agent (or the upstream) may not set: the proxy sets its own.
_IDENTITY_PREFIXES = ("x-forwarded-", "x-agent-proxy-")
_DROPPED = relay.HOP_BY_HOP | {"host", "forwarded", "x-real-ip", "content-length"}
# What each direction drops besides: the proxy sets X-Request-ID itself, and the
# upstream's Authorization is for the proxy, never for an agent.
_NORTHBOUND_DROPPED = _DROPPED | {"x-request-id"}
_SOUTHBOUND_DROPPED = _DROPPED | {"x-request-id", "authorization"}
# URL-safe: RFC 3986's unreserved characters (secrets.token_urlsafe() makes such nonces);
# not base64's +, / and =, which a URL must escape.
_NONCE_RE = re.compile(r"[A-Za-z0-9._~-]{8,256}")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")   # the whole value: fullmatch
# RFC 9110 7.6.3: a proxy adds itself to Via, with the protocol version it received, on
# every message it forwards (requests both ways, and their answers).
VIA = "1.1 agent-proxy"
RELAYED = "agent_proxy.relayed"  # environ key: this answer is an origin's, relayed
_ERROR_HEADER_LOWER = ERROR_HEADER.lower()


@dataclass
class WorkerState:
    """Runtime state of one worker process; survives a configuration reload."""

    draining: bool = False
    upstream_heard: float = 0.0  # monotonic time the upstream last answered or called us
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    probe_lock: threading.Lock = field(default_factory=threading.Lock)
    last_probe: float = -1e9
    last_probe_error: str = "the upstream has not been heard from yet"
    # Features found failed while running (feature -> reason), e.g. by the readiness probe.
    found_failures: dict = field(default_factory=dict)

    def heard_from_upstream(self) -> None:
        self.upstream_heard = time.monotonic()


# -- helpers over the WSGI environ


class RequestIds:
    """Unique request ids without a system call each: a random process prefix and a counter."""

    def __init__(self):
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def keep_or_new(self, env: dict) -> str:
        given = env.get("HTTP_X_REQUEST_ID", "")
        if given and _REQUEST_ID_RE.fullmatch(given):
            return given
        return f"{self._prefix}-{next(self._counter):x}"


_header_names: dict[str, tuple[str, str]] = {}


def _header_name(key: str) -> tuple[str, str]:
    """HTTP_X_REQUEST_ID -> ("X-Request-Id", "x-request-id"), memoised."""
    names = _header_names.get(key)
    if names is None:
        parts = key[5:].split("_")
        name = "-".join(p.capitalize() for p in parts)
        names = _header_names[key] = (name, name.lower())
    return names


def incoming_headers(env: dict, dropped: frozenset = _DROPPED) -> list[tuple[str, str]]:
    """The request's end-to-end headers, minus ``dropped``, the identity headers and the
    headers ``Connection`` names."""
    connection = env.get("HTTP_CONNECTION", "")
    named = {t.strip().lower() for t in connection.split(",")} if connection else set()
    out = []
    for key, value in env.items():
        if not key.startswith("HTTP_"):
            continue
        name, lower = _header_name(key)
        if lower in dropped or lower in named or lower.startswith(_IDENTITY_PREFIXES):
            continue
        out.append((name, value))
    content_type = env.get("CONTENT_TYPE")
    if content_type:
        out.append(("Content-Type", content_type))
    return out


# RFC 9110 7.6.2: Max-Forwards counts the proxies an OPTIONS or TRACE may still pass; on
# any other method it passes untouched. At 0 the proxy answers as the final recipient:
# OPTIONS with the methods it relays, TRACE with 405 (it reflects no request: a reflected
# request would echo credentials back, RFC 9110 9.3.8).
_HOP_LIMITED = frozenset({"OPTIONS", "TRACE"})
RELAYED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def relayed_headers(req: falcon.Request, resp: falcon.Response, dropped: frozenset) -> list[tuple[str, str]] | None:
    """The headers to relay (``incoming_headers``), an OPTIONS or TRACE's Max-Forwards one
    less; None when it was 0 and ``resp`` holds the proxy's answer as the final recipient."""
    headers = incoming_headers(req.env, dropped)
    value = req.env.get("HTTP_MAX_FORWARDS") if req.method in _HOP_LIMITED else None
    if value is None:
        return headers
    value = value.strip(" \t")
    if not (value.isascii() and value.isdigit()):
        raise ProxyError("bad-request", f"Max-Forwards is one number (RFC 9110 7.6.2), not {value[:40]!r}")
    if int(value) == 0:
        if req.method == "TRACE":
            raise ProxyError("method-not-allowed", "Max-Forwards is 0, and this proxy reflects no TRACE",
                             {"Allow": RELAYED_METHODS})
        resp.status = falcon.HTTP_200
        resp.set_header("Allow", RELAYED_METHODS)
        resp.data = b""
        return None
    left = str(int(value) - 1) if len(value) < 10 else "999999999"  # a count no path comes near
    return [(name, left if name == "Max-Forwards" else item) for name, item in headers]


def raw_target(env: dict) -> str:
    """The request target exactly as the client sent it (not decoded)."""
    target = env.get("REQUEST_URI")
    if target is None:  # not waitress (e.g. falcon.testing): rebuild it
        query = env.get("QUERY_STRING")
        target = env.get("PATH_INFO", "/") + (f"?{query}" if query else "")
    return target


def _unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address, an IPv4-mapped IPv6 one as IPv4; None when it is none."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    return addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr


@functools.lru_cache(maxsize=8192)
def canonical_ip(text: str) -> str:
    """An address as the proxy writes it: compressed, IPv4-mapped IPv6 as IPv4; ``text``
    as it is when it is no address."""
    addr = _unmapped(text)
    return text if addr is None else str(addr)


@functools.lru_cache(maxsize=8192)
def _in_networks(ip: str, networks: tuple) -> bool:
    """Is ``ip`` inside one of ``networks``? Remembered: agents call again and again."""
    addr = _unmapped(ip)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


# -- the application


class Proxy:
    """Everything one configuration needs at request time, built once."""

    def __init__(
        self, config: Config, secret: bytes, state: WorkerState, metrics: Metrics,
        access_lines: LineWriter | None = None, siblings: list[tuple[str, int]] | None = None,
    ):
        self.config = config
        # (host, port) of the node's other workers, whose metrics a scrape merges.
        self.siblings = siblings or []
        self.secret = secret
        self.state = state
        self.metrics = metrics
        self.trusted = frozenset(canonical_ip(str(a)) for a in config.trusted_proxies)
        # A failed feature's TLS context is never built: its requests are refused instead.
        self.timeouts = config.upstream.timeouts()
        up = config.upstream
        self.upstream = relay.Origin.from_url(up.url, self.timeouts, relay.client_context(
            up.ca_file, True, up.client_cert, up.client_key,
        ) if up.url.startswith("https:") and "northbound" not in config.failed_features else None)
        self.upstream_prefix = urlsplit(up.url).path.rstrip("/")
        self.agent_scheme = "https" if config.agents.tls else "http"
        self.agent_context = (
            relay.client_context(config.agents.ca_file, config.agents.verify)
            if config.agents.tls and "southbound" not in config.failed_features else None
        )
        self.cache = relay.ConnectionCache(limit=config.upstream.pool_size, per_thread=4)
        self.request_ids = RequestIds()
        self.access_log = AccessLog(config.logging.level, config.logging.format, access_lines, config.logging.access_health)

    def failures(self) -> dict[str, str]:
        """Failed features (feature -> reason): at start or reload, and found since."""
        return {**self.config.failed_features, **self.state.found_failures}

    def features(self) -> dict:
        return features.feature_map(self.config, self.failures())

    def refuse_if_failed(self, feature: str) -> None:
        reason = self.config.failed_features.get(feature)
        if reason:
            raise ProxyError("feature-failed", f"{feature} is failed: {reason}")

    def client_ip(self, env: dict) -> str:
        """The caller's address; X-Forwarded-For is believed only from trusted_proxies.

        An IPv4 address in IPv6's mapped form (``::ffff:10.0.0.2``, from a dual-stack
        socket or a front) is written as IPv4: the upstream keys an agent by its address,
        and one agent must not appear under two."""
        peer = canonical_ip(env.get("REMOTE_ADDR", ""))
        if peer in self.trusted:
            forwarded = env.get("HTTP_X_FORWARDED_FOR")
            if forwarded:
                # The trusted front appends the address it saw; that is the last element.
                addr = _unmapped(forwarded.rsplit(",", 1)[-1].strip())
                if addr is None:
                    raise ProxyError("bad-forwarded-for", "unparseable X-Forwarded-For from the front")
                return str(addr)
        return peer

    def verify_upstream(self, req: falcon.Request, target: str) -> None:
        try:
            signing.verify_authorization(
                req.get_header("Authorization"), self.secret, self.config.proxy_id,
                req.method, target, self.config.limits.auth_skew_seconds,
            )
        except signing.SignatureError as exc:
            self.metrics.rejected.labels("signature").inc()
            # RFC 9110 11.6.1: a 401 says how to authenticate.
            raise ProxyError("bad-signature", str(exc), {"WWW-Authenticate": signing.AUTH_SCHEME}) from None
        self.state.heard_from_upstream()

    def check_upstream_source(self, ip: str) -> None:
        networks = self.config.networks.upstream
        if networks and not _in_networks(ip, networks):
            self.metrics.rejected.labels("source").inc()
            raise ProxyError("source-not-allowed", f"{ip} is not in networks.upstream")

    def relay_answer(self, req: falcon.Request, resp: falcon.Response, answer: relay.Answer) -> None:
        req.env[RELAYED] = True  # the task leaves waitress's Server header off an origin's answer
        resp.status = f"{answer.status} {answer.reason}"
        for name, value in answer.headers:
            resp.append_header(name, value)
        resp.append_header("Via", VIA)
        if answer.length is not None and req.method != "HEAD":
            resp.data = b"".join(answer.body)
        else:
            # A stream has no length of its own: Falcon adds no Content-Length, so a HEAD
            # answer carries the origin's or none (never a made-up 0).
            resp.stream = iter(answer.body)

    def origin_failure(self, info: dict, exc: relay.OriginError) -> ProxyError:
        """The answer for an origin (the upstream, or an agent southbound) that failed
        before its head was relayed."""
        direction = info["direction"]
        self.metrics.origin_errors.labels(direction, exc.kind).inc()
        if exc.kind == "bad-answer":
            logs.event(log, f"refused an answer: {exc}", logging.WARNING, request_id=info.get("request_id", ""))
            return ProxyError("bad-answer", str(exc))
        peer = "agent" if direction == "southbound" else "upstream"
        return ProxyError(f"{peer}-{exc.kind}", str(exc))


class Policy(enum.Enum):
    """Who may call a route. Each is checked by ``Guard``; there is no "anyone else"."""

    OPEN = "anyone"
    AGENTS = "source in `networks.agents`"
    UPSTREAM = "signed by the upstream; source in `networks.upstream` when set"
    METRICS = "source in `networks.upstream` or `trusted_proxies`"

    @property
    def upstream_facing(self) -> bool:
        """With listen_control, served on the control listener only (OPEN: on both)."""
        return self in (Policy.UPSTREAM, Policy.METRICS)


@dataclass(frozen=True)
class Route:
    """A path the worker serves, who may call it, and how its handler is built."""

    methods: str  # for the README's table
    path: str  # exact; with ``prefix``, every path that starts with it
    policy: Policy
    direction: str  # the access log's "direction"
    build: Callable[["Proxy"], object]
    prefix: bool = False
    health: bool = False  # a balancer's check: no access line unless logging.access_health

    def __post_init__(self):
        if not isinstance(self.policy, Policy):
            raise TypeError(f"route {self.path}: policy must be a Policy, got {self.policy!r}")


PROXY_PREFIX = "/_proxy/"


class RouteTable:
    """The routes, looked up the way Falcon routes them; under /_proxy/ only what is declared."""

    def __init__(self, routes: tuple[Route, ...]):
        self.exact = {r.path: r for r in routes if not r.prefix}
        self.health_paths = frozenset(r.path for r in routes if r.health)
        self.prefixes = sorted((r for r in routes if r.prefix), key=lambda r: -len(r.path))

    def find(self, path: str) -> Route | None:
        route = self.exact.get(path)
        if route is not None:
            return route
        own = path.startswith(PROXY_PREFIX)
        for route in self.prefixes:
            if path.startswith(route.path) and (own == route.path.startswith(PROXY_PREFIX)):
                return route
        return None


class Guard:
    """Middleware: who may call what, from the route table. Runs before routing.

    An undeclared path under /_proxy/ is 404 before any other check, for every caller:
    the answer is the same whoever asks, so it tells nothing about sources or secrets.
    """

    def __init__(self, proxy: Proxy, table: RouteTable, control_port: int | None = None):
        self.proxy = proxy
        self.table = table
        self.control_port = str(control_port) if control_port else None

    def separate_listeners(self, env: dict, path: str, route: Route) -> None:
        """With listen_control, upstream-facing routes live on their own port only."""
        if route.policy is Policy.OPEN:
            return
        on_control_port = env.get("SERVER_PORT") == self.control_port
        if route.policy.upstream_facing == on_control_port:
            return
        where = "the control listener" if route.policy.upstream_facing else "the agent listener"
        raise ProxyError("not-found", f"{path} is served on {where} only")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        env = req.env
        proxy = self.proxy
        ip = proxy.client_ip(env)
        info = env["agent_proxy.log"]
        info["client_ip"] = ip
        # The target as the client sent it: what is signed and relayed (the sinks read it here).
        target = info["raw_target"] = raw_target(env)
        if req.method == "CONNECT":  # whatever its target (authority-form, as CONNECT has it, or a path)
            raise ProxyError("method-not-allowed", "CONNECT is never relayed", {"Allow": RELAYED_METHODS})
        if target == "*":
            raise ProxyError("bad-target", f"the asterisk-form target ({req.method} *) asks about a server; "
                                           "this proxy relays requests for paths only")
        if not target.startswith("/"):
            raise ProxyError("bad-target", "absolute-form request targets are not accepted; this is not a forward proxy")
        path = req.path
        route = self.table.find(path)
        if route is None:
            raise ProxyError("not-found", f"{path} is not a path of this proxy")
        if self.control_port is not None:
            self.separate_listeners(env, path, route)
        info["direction"] = route.direction
        policy = route.policy
        if policy is Policy.OPEN:
            return
        if policy is Policy.AGENTS:
            if not _in_networks(ip, proxy.config.networks.agents):
                proxy.metrics.rejected.labels("source").inc()
                raise ProxyError("source-not-allowed", f"{ip} is not in networks.agents")
        elif policy is Policy.METRICS:
            if ip not in proxy.trusted and not _in_networks(ip, proxy.config.networks.upstream):
                raise ProxyError("source-not-allowed", f"{ip} may not read metrics")
        elif policy is Policy.UPSTREAM:
            proxy.check_upstream_source(ip)
            proxy.verify_upstream(req, target)


class Northbound:
    """Sink: relay an agent's request to the upstream, stamped and signed."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def __call__(self, req: falcon.Request, resp: falcon.Response, **kwargs) -> None:
        proxy, env = self.proxy, req.env
        info = env["agent_proxy.log"]
        ip = info["client_ip"]
        target = proxy.upstream_prefix + info["raw_target"]
        info["target"] = req.path
        config = proxy.config
        proxy.refuse_if_failed("northbound")
        request_id = info["request_id"] = proxy.request_ids.keep_or_new(env)
        headers = relayed_headers(req, resp, _NORTHBOUND_DROPPED)
        if headers is None:  # Max-Forwards 0: answered here
            return
        proto = env.get("HTTP_X_FORWARDED_PROTO") if canonical_ip(env.get("REMOTE_ADDR", "")) in proxy.trusted else None
        proto = proto.lower() if proto and proto.lower() in ("http", "https") else env.get("wsgi.url_scheme", "http")
        ts = int(time.time())
        sig = signing.signature(proxy.secret, ts, config.proxy_id, req.method, target, ip)
        for_value = f'"[{ip}]"' if ":" in ip else f'"{ip}"'
        headers += [
            ("Host", proxy.upstream.authority),
            ("X-Agent-Proxy-Id", config.proxy_id),
            ("X-Agent-Proxy-Client-IP", ip),
            ("X-Agent-Proxy-Signature", f"v1 ts={ts}, sig={sig}"),
            # The contract's form (RFC 7239): who sent it, through which proxy; the scheme
            # is X-Forwarded-Proto's.
            ("Forwarded", f'for={for_value};by="{config.proxy_id}"'),
            ("X-Forwarded-For", ip),
            ("X-Forwarded-Proto", proto),
            ("X-Request-ID", request_id),
            ("Via", VIA),
        ]
        length = _body_length(req, config)
        info["bytes_in"] = length
        started = time.perf_counter()
        try:
            answer = relay.forward(proxy.cache, proxy.upstream, req.method, target, headers, env["wsgi.input"], length)
        except relay.OriginError as exc:
            raise proxy.origin_failure(info, exc) from None
        finally:
            info["origin_seconds"] = time.perf_counter() - started
        state = proxy.state
        state.heard_from_upstream()
        if state.found_failures:  # the way to the upstream works (again)
            state.found_failures.pop("northbound", None)
        proxy.relay_answer(req, resp, answer)


class Southbound:
    """Sink: relay a signed upstream request to one agent, after checking the target."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def __call__(self, req: falcon.Request, resp: falcon.Response, **kwargs) -> None:
        proxy, env = self.proxy, req.env
        info = env["agent_proxy.log"]
        proxy.refuse_if_failed("southbound")
        target = targets.parse(info["raw_target"], proxy.config)
        info["target"] = f"{target.ip}:{target.port}{target.path_and_query.split('?', 1)[0]}"
        request_id = info["request_id"] = proxy.request_ids.keep_or_new(env)
        headers = relayed_headers(req, resp, _SOUTHBOUND_DROPPED)
        if headers is None:  # Max-Forwards 0: answered here
            return
        origin = relay.Origin(proxy.agent_scheme, target.ip, target.port, *proxy.timeouts, proxy.agent_context)
        headers += [("Host", origin.authority), ("X-Request-ID", request_id), ("Via", VIA)]
        length = _body_length(req, proxy.config)
        info["bytes_in"] = length
        started = time.perf_counter()
        try:
            answer = relay.forward(proxy.cache, origin, req.method, target.path_and_query, headers, env["wsgi.input"], length)
        except relay.OriginError as exc:
            raise proxy.origin_failure(info, exc) from None
        finally:
            info["origin_seconds"] = time.perf_counter() - started
        proxy.relay_answer(req, resp, answer)


def _body_length(req: falcon.Request, config: Config) -> int:
    length = req.content_length or 0
    if length > config.limits.max_body_bytes:
        raise ProxyError("body-too-large", f"{length} bytes; limits.max_body_bytes is {config.limits.max_body_bytes}")
    return length


def _json(resp: falcon.Response, data, status: int = 200) -> None:
    resp.status = status
    resp.content_type = "application/json"
    resp.data = json.dumps(data).encode()


# -- the proxy's own endpoints


class Health:
    def __init__(self, state: WorkerState):
        self.state = state

    def on_get(self, req, resp):
        if self.state.draining:
            _json(resp, {"status": "draining"}, 503)
        else:
            _json(resp, {"status": "ok"})


class Ready:
    """200 while the upstream was heard from within upstream.ready_window, else probe it."""

    PROBE_INTERVAL = 2.0

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def _probe(self) -> None:
        state, proxy = self.proxy.state, self.proxy
        if not state.probe_lock.acquire(blocking=False):
            return  # another request is probing right now
        try:
            if time.monotonic() - state.last_probe < self.PROBE_INTERVAL:
                return
            state.last_probe = time.monotonic()
            origin = replace(
                proxy.upstream, connect_timeout=min(proxy.upstream.connect_timeout, 2.0), head_timeout=2.0, idle_timeout=2.0,
            )
            try:  # any answer means: reachable; the connection is not kept (a cache of none)
                relay.forward(
                    relay.ConnectionCache(limit=0), origin, "HEAD", proxy.upstream_prefix + "/",
                    [("Host", origin.authority)], io.BytesIO(), 0,
                )
            except relay.OriginError as exc:
                state.last_probe_error = f"cannot reach the upstream {proxy.config.upstream.url}: {exc}"
                untrusted = exc.__context__
                if isinstance(untrusted, ssl.SSLCertVerificationError):
                    state.found_failures["northbound"] = (
                        f"the upstream's certificate is not trusted: {untrusted.verify_message or untrusted.reason} "
                        f"(upstream.ca_file: {proxy.config.upstream.ca_file or 'system CAs'})"
                    )
                return
            state.found_failures.pop("northbound", None)
            state.heard_from_upstream()
        finally:
            state.probe_lock.release()

    def upstream_ready(self) -> bool:
        """Was the upstream heard from within upstream.ready_window? Probes it if not."""
        if "northbound" in self.proxy.config.failed_features:
            return False
        state, window = self.proxy.state, self.proxy.config.upstream.ready_window
        if time.monotonic() - state.upstream_heard > window:
            self._probe()
        return time.monotonic() - state.upstream_heard <= window

    def on_get(self, req, resp):
        """503 while draining or when agents cannot reach the upstream; names failed features either way."""
        ready = self.upstream_ready()
        failed = {"failed": failures} if (failures := self.proxy.failures()) else {}
        if self.proxy.state.draining:
            _json(resp, {"status": "draining"}, 503)
        elif ready:
            _json(resp, {"status": "ready", **failed})
        else:
            reason = failures.get("northbound") or self.proxy.state.last_probe_error
            _json(resp, {"status": "not ready", "description": reason, **failed}, 503)


class Features:
    """``/_proxy/features``: the names of running features (Foreman's classic list)."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def on_get(self, req, resp):
        _json(resp, features.running(self.proxy.features()))


class FeaturesV2:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def on_get(self, req, resp):
        _json(resp, self.proxy.features())


class Handshake:
    """The upstream checks that this proxy holds the secret: sign its nonce back."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def on_post(self, req, resp):
        length = req.content_length or 0
        try:
            data = json.loads(req.bounded_stream.read(min(length, 4096)) or b"null")
        except ValueError:
            data = None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
            raise ProxyError("bad-nonce", 'body must be {"nonce": "<8-256 URL-safe characters>"}')
        config = self.proxy.config
        resp.set_header(
            "X-Agent-Proxy-Signature",
            signing.signature_header(self.proxy.secret, config.proxy_id, signing.HANDSHAKE_METHOD, nonce),
        )
        _json(resp, {"proxy_id": config.proxy_id, "version": __version__, "nonce": nonce, "features": features.running(self.proxy.features())})


class MetricsResource:
    """The node's metrics: this worker's merged with its siblings' (``?scope=worker``: this one only)."""

    def __init__(self, metrics: Metrics, siblings: list[tuple[str, int]]):
        self.metrics = metrics
        self.siblings = siblings

    def on_get(self, req, resp):
        resp.content_type = self.metrics.content_type
        if req.get_param("scope") == "worker":
            resp.data = self.metrics.render()
        else:
            resp.data = scrape_node(self.metrics, self.siblings)


# -- the WSGI layer: access log, metrics, in-flight bound


class Worker:
    """The WSGI callable waitress serves: counts, logs and bounds every request."""

    def __init__(self, falcon_app: falcon.App, proxy: Proxy, table: RouteTable):
        self.falcon_app = falcon_app
        self.proxy = proxy
        self.table = table

    def _refuse_overload(self, env, info, started, start_response) -> list[bytes] | None:
        """Past limits.max_in_flight: 503 at once, logged like any answer. Open routes
        (health, ready) are still answered: None."""
        route = self.table.find(env.get("PATH_INFO", ""))
        if route is not None and route.policy is Policy.OPEN:
            return None
        self.proxy.metrics.rejected.labels("overload").inc()
        try:
            info["client_ip"] = self.proxy.client_ip(env)
        except ProxyError:
            pass  # a bad X-Forwarded-For: the line names the peer; the answer is 503 either way
        info.update(direction=route.direction if route else "local", error="overloaded")
        status, headers, data = wsgi_answer(
            ProxyError("overloaded", "limits.max_in_flight requests are in flight", {"Retry-After": "1"}))
        start_response(status, headers)
        self._finish(env, info, [status], started, len(data))
        return [data]

    def __call__(self, env, start_response):
        state = self.proxy.state
        started = time.perf_counter()
        info = env["agent_proxy.log"] = {"direction": "local", "client_ip": env.get("REMOTE_ADDR", ""), "bytes_in": 0}
        with state.lock:
            state.in_flight += 1
        if rejecting() and (refused := self._refuse_overload(env, info, started, start_response)) is not None:
            return refused
        status_holder = []

        def recording_start_response(status, headers, exc_info=None):
            status_holder.append(status)
            if status[0] in "45":  # only the proxy's own errors carry the header
                for name, value in headers:
                    if name.lower() == _ERROR_HEADER_LOWER:
                        info["error"] = value
            return start_response(status, headers, exc_info)

        try:
            body = self.falcon_app(env, recording_start_response)
        except BaseException:
            self._leave()
            raise
        if isinstance(body, list):
            self._finish(env, info, status_holder, started, sum(map(len, body)))
            return body
        return _Counted(body, self, env, info, status_holder, started, recording_start_response)

    def _leave(self) -> None:
        with self.proxy.state.lock:
            self.proxy.state.in_flight -= 1

    def _finish(self, env, info, status_holder, started, sent: int) -> None:
        self._leave()
        duration = time.perf_counter() - started
        status = int(status_holder[-1][:3]) if status_holder else 500
        self.proxy.metrics.observe(info["direction"], status, duration, info["bytes_in"], sent, info.get("origin_seconds"))
        access_log = self.proxy.access_log
        if access_log.enabled and (access_log.health or env.get("PATH_INFO") not in self.table.health_paths):
            fields = {
                "request_id": info.get("request_id", ""),
                "direction": info["direction"],
                "client_ip": info["client_ip"],
                "method": env.get("REQUEST_METHOD"),
                "target": info.get("target") or env.get("PATH_INFO", ""),
                "status": status,
                "bytes_in": info["bytes_in"],
                "bytes_out": sent,
                "duration_ms": round(duration * 1000, 3),
                # truncated (set where the cut is made); refused: the proxy answered with
                # its own error instead of relaying; else complete.
                "outcome": info.get("outcome") or ("refused" if "error" in info else "complete"),
            }
            # Only where they apply: the proxy's own error code, the time the origin took
            # to be connected to and to answer (first byte).
            if "error" in info:
                fields["error"] = info["error"]
            if "origin_seconds" in info:
                fields["origin_ms"] = round(info["origin_seconds"] * 1000, 3)
            access_log.write(fields)


class AbortAnswer(ClientDisconnected):
    """Raised from a streamed answer to cut the client's connection mid-answer.

    waitress treats it as a client gone: it closes the connection once what was written
    is sent, without the last chunk of a chunked answer (or short of its Content-Length),
    and logs it at info only. Any other exception does the same but with a traceback.
    """


class _Counted:
    """A streamed answer: counts bytes and logs when waitress closes it."""

    def __init__(self, body, worker: Worker, env, info, status_holder, started, start_response):
        self._body = body
        self._args = (env, info, status_holder, started)
        self._worker = worker
        self._start_response = start_response
        self._sent = 0

    def __iter__(self):
        try:
            for chunk in self._body:
                self._sent += len(chunk)
                yield chunk
        except relay.BrokenBody as exc:
            info, proxy = self._args[1], self._worker.proxy
            if not self._sent:
                # waitress sends the head with the first piece: none went out, so the
                # answer can still be the error it is (502 bad-answer, 504).
                status, headers, data = wsgi_answer(proxy.origin_failure(info, exc))
                self._args[0].pop(RELAYED, None)   # the proxy's own answer: its Server header
                self._start_response(status, headers, sys.exc_info())
                self._sent = len(data)
                yield data
                return
            info["outcome"] = "truncated"
            proxy.metrics.truncated.labels(info["direction"]).inc()
            logs.event(log, f"cut the client's connection: {exc}", logging.WARNING, request_id=info.get("request_id", ""))
            raise AbortAnswer(str(exc)) from None

    def close(self):
        try:
            close = getattr(self._body, "close", None)
            if close:
                close()
        finally:
            self._worker._finish(*self._args, self._sent)


# Every route the worker serves, with who may call it: the only place a route is added
# (create_app wires these and nothing else; the app refuses routes added later).
ROUTES = (
    Route("GET", "/_proxy/health", Policy.OPEN, "local", lambda proxy: Health(proxy.state), health=True),
    Route("GET", "/_proxy/ready", Policy.OPEN, "local", Ready, health=True),
    Route("GET", "/_proxy/features", Policy.OPEN, "local", Features),
    Route("GET", "/_proxy/v2/features", Policy.UPSTREAM, "control", FeaturesV2),
    Route("POST", "/_proxy/handshake", Policy.UPSTREAM, "control", Handshake),
    Route("GET", "/_proxy/metrics", Policy.METRICS, "control", lambda proxy: MetricsResource(proxy.metrics, proxy.siblings)),
    Route("ANY", targets.PREFIX, Policy.UPSTREAM, "southbound", Southbound, prefix=True),
    # Everything outside /_proxy/ (the lookup never gives a /_proxy/ path to this one).
    Route("ANY", "/", Policy.AGENTS, "northbound", Northbound, prefix=True),
)


class _SealedApp(falcon.App):
    """A Falcon app that takes no route or sink once create_app has wired the table."""

    sealed = False

    def add_route(self, *args, **kwargs):
        self._refuse_when_sealed()
        return super().add_route(*args, **kwargs)

    def add_sink(self, *args, **kwargs):
        self._refuse_when_sealed()
        return super().add_sink(*args, **kwargs)

    def _refuse_when_sealed(self):
        if self.sealed:
            raise RuntimeError("routes are declared in app.ROUTES, each with its policy; add it there")


def create_app(
    config: Config, secret: bytes, state: WorkerState | None = None, metrics: Metrics | None = None,
    control_port: int | None = None, access_lines: LineWriter | None = None,
    siblings: list[tuple[str, int]] | None = None, routes: tuple[Route, ...] = ROUTES,
) -> Worker:
    """Build the worker's WSGI application for ``config``; nothing is shared between calls.

    ``control_port``: the port of the separate control listener (``listen_control``), if any.
    ``access_lines``: where access log lines go (a worker's ``LineBatch``, written by its
    main loop); without it, each line is written to stdout by the thread that served it.
    ``siblings``: (host, port) of the node's other workers, whose metrics a scrape merges.
    ``routes``: the route table (tests pass their own to check the guard).
    """
    state = state or WorkerState()
    state.found_failures.clear()  # a new configuration is judged afresh
    metrics = metrics or Metrics()
    proxy = Proxy(config, secret, state, metrics, access_lines, siblings)
    table = RouteTable(routes)
    app = _SealedApp(middleware=[Guard(proxy, table, control_port)], media_type=None)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_error_handler(ProxyError, handle_proxy_error)
    app.set_error_serializer(serialize_falcon_error)
    _export_gauges(metrics, proxy, Ready(proxy))
    for route in routes:
        handler = route.build(proxy)
        if not route.prefix:
            if hasattr(handler, "on_get") and not hasattr(handler, "on_head"):
                # RFC 9110 9.1: HEAD wherever GET is (a balancer may check with it);
                # Falcon sends the head, and the length GET's body would have, without it.
                handler.on_head = handler.on_get
            app.add_route(route.path, handler)
        elif route.path.startswith(PROXY_PREFIX):
            app.add_sink(handler, prefix="^" + re.escape(route.path))
        else:
            app.add_sink(handler, prefix="^" + re.escape(route.path) + "(?!" + re.escape(PROXY_PREFIX[1:]) + ")")
    app.sealed = True
    return Worker(app, proxy, table)


def _export_gauges(metrics: Metrics, proxy: Proxy, ready: Ready) -> None:
    """Gauges that follow the configuration: set again by every app a reload builds."""
    config = proxy.config
    metrics.max_in_flight.set(config.limits.max_in_flight)
    metrics.upstream_ready.set_function(lambda: float(ready.upstream_ready()))
    for name in features.NAMES:
        metrics.feature_failed.labels(name).set_function(lambda name=name: float(name in proxy.failures()))
    metrics.certificate_expiry.clear()
    for name, path in (("front", config.tls.cert_file), ("upstream-client", config.upstream.client_cert)):
        expires = tlsutil.not_after(path) if path else None
        if expires is not None:
            metrics.certificate_expiry.labels(name).set(expires)
