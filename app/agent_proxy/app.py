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

import functools
import http
import io
import ipaddress
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import falcon
from waitress.channel import ClientDisconnected

from . import __version__, logs, relay, signing, targets
from .config import Config
from .errors import ERROR_HEADER, ProxyError, body as error_body, bad_target, forbidden, handle_proxy_error, serialize_falcon_error, unauthorized
from .logs import AccessLog, LineWriter
from .metrics import Metrics
from .overload import rejecting

log = logging.getLogger("agent_proxy")

# Headers an agent (or the upstream) may not set: the proxy sets its own.
_IDENTITY_PREFIXES = ("x-forwarded-", "x-agent-proxy-")
_DROPPED = relay.HOP_BY_HOP | {"host", "forwarded", "x-real-ip", "content-length"}
_NONCE_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{8,256}$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CONTROL_PATHS = ("/_proxy/handshake", "/_proxy/v2/features", "/_proxy/metrics")
_OPEN_PATHS = ("/_proxy/health", "/_proxy/ready", "/_proxy/features")


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
        if given and _REQUEST_ID_RE.match(given):
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


def incoming_headers(env: dict, also_drop: frozenset = frozenset()) -> list[tuple[str, str]]:
    """The request's end-to-end headers, minus every header the proxy sets itself."""
    connection = env.get("HTTP_CONNECTION", "")
    named = {t.strip().lower() for t in connection.split(",")} if connection else set()
    out = []
    for key, value in env.items():
        if not key.startswith("HTTP_"):
            continue
        name, lower = _header_name(key)
        if lower in _DROPPED or lower in named or lower in also_drop or lower.startswith(_IDENTITY_PREFIXES):
            continue
        out.append((name, value))
    content_type = env.get("CONTENT_TYPE")
    if content_type:
        out.append(("Content-Type", content_type))
    return out


def raw_target(env: dict) -> str:
    """The request target exactly as the client sent it (not decoded)."""
    target = env.get("REQUEST_URI")
    if target is None:  # not waitress (e.g. falcon.testing): rebuild it
        query = env.get("QUERY_STRING")
        target = env.get("PATH_INFO", "/") + (f"?{query}" if query else "")
    return target


@functools.lru_cache(maxsize=8192)
def _in_networks(ip: str, networks: tuple) -> bool:
    """Is ``ip`` inside one of ``networks``? Remembered: agents call again and again."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in networks)


# -- the application


class Proxy:
    """Everything one configuration needs at request time, built once."""

    def __init__(self, config: Config, secret: bytes, state: WorkerState, metrics: Metrics, access_lines: LineWriter | None = None):
        self.config = config
        self.secret = secret
        self.state = state
        self.metrics = metrics
        self.trusted = frozenset(str(a) for a in config.trusted_proxies)
        up = urlsplit(config.upstream.url)
        self.timeouts = connect_timeout, head_timeout, idle_timeout = config.upstream.timeouts()
        self.upstream = relay.Origin(
            scheme=up.scheme,
            host=up.hostname,
            port=up.port or (443 if up.scheme == "https" else 80),
            connect_timeout=connect_timeout,
            head_timeout=head_timeout,
            idle_timeout=idle_timeout,
            ssl_context=relay.client_context(
                config.upstream.ca_file, True, config.upstream.client_cert, config.upstream.client_key
            ) if up.scheme == "https" else None,
        )
        self.upstream_prefix = up.path.rstrip("/")
        self.agent_context = (
            relay.client_context(config.agents.ca_file, config.agents.verify) if config.agents.tls else None
        )
        self.cache = relay.ConnectionCache(limit=config.upstream.pool_size, per_thread=4)
        self.request_ids = RequestIds()
        self.access_log = AccessLog(config.logging.level, config.logging.format, access_lines)

    def client_ip(self, env: dict) -> str:
        """The caller's address; X-Forwarded-For is believed only from trusted_proxies."""
        peer = env.get("REMOTE_ADDR", "")
        if peer in self.trusted:
            forwarded = env.get("HTTP_X_FORWARDED_FOR")
            if forwarded:
                # The trusted front appends the address it saw; that is the last element.
                candidate = forwarded.rsplit(",", 1)[-1].strip()
                try:
                    return str(ipaddress.ip_address(candidate))
                except ValueError:
                    raise ProxyError(400, "bad-forwarded-for", "Bad request", "unparseable X-Forwarded-For from the front") from None
        return peer

    def verify_upstream(self, req: falcon.Request) -> None:
        try:
            signing.verify_authorization(
                req.get_header("Authorization"), self.secret, self.config.proxy_id,
                req.method, raw_target(req.env), self.config.limits.auth_skew_seconds,
            )
        except signing.SignatureError as exc:
            self.metrics.rejected.labels("signature").inc()
            raise unauthorized(str(exc)) from None
        self.state.heard_from_upstream()

    def check_upstream_source(self, ip: str) -> None:
        networks = self.config.networks.upstream
        if networks and not _in_networks(ip, networks):
            self.metrics.rejected.labels("source").inc()
            raise forbidden("source-not-allowed", f"{ip} is not in networks.upstream")

    def relay_answer(self, resp: falcon.Response, answer: relay.Answer) -> None:
        resp.status = f"{answer.status} {answer.reason}"
        for name, value in answer.headers:
            resp.append_header(name, value)
        if answer.length is not None:
            resp.data = b"".join(answer.body)
        else:
            resp.stream = answer.body

    def origin_failure(self, info: dict, peer: str, exc: relay.OriginError) -> ProxyError:
        """The answer for an origin that failed before its head was relayed."""
        self.metrics.origin_errors.labels(info["direction"], exc.kind).inc()
        if exc.kind == "timeout":
            return ProxyError(504, f"{peer}-timeout", "Gateway timeout", str(exc))
        if exc.kind == "bad-answer":
            info["outcome"] = "refused"
            logs.event(log, f"refused an answer: {exc}", logging.WARNING, request_id=info.get("request_id", ""))
            return ProxyError(502, "bad-answer", "Bad gateway", str(exc))
        return ProxyError(502, f"{peer}-{exc.kind}", "Bad gateway", str(exc))


class Guard:
    """Middleware: who may call what. Runs before routing so that nothing slips past."""

    def __init__(self, proxy: Proxy, control_port: int | None = None):
        self.proxy = proxy
        self.control_port = str(control_port) if control_port else None

    def separate_listeners(self, env: dict, path: str) -> None:
        """With listen_control, upstream-facing paths live on their own port only."""
        upstream_facing = path.startswith(targets.PREFIX) or path.startswith(_CONTROL_PATHS)
        on_control_port = env.get("SERVER_PORT") == self.control_port
        if path.startswith(_OPEN_PATHS) or upstream_facing == on_control_port:
            return
        where = "the control listener" if upstream_facing else "the agent listener"
        raise ProxyError(404, "not-found", "Not found", f"{path} is served on {where} only")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        env = req.env
        proxy = self.proxy
        ip = proxy.client_ip(env)
        info = env["agent_proxy.log"]
        info["client_ip"] = ip
        target = raw_target(env)
        if not target.startswith("/"):
            raise bad_target("absolute-form request targets are not accepted; this is not a forward proxy")
        if req.method == "CONNECT":
            raise ProxyError(405, "method-not-allowed", "Method not allowed", "CONNECT is never relayed")
        path = req.path
        if self.control_port is not None:
            self.separate_listeners(env, path)
        if not path.startswith("/_proxy/"):
            info["direction"] = "northbound"
            if not _in_networks(ip, proxy.config.networks.agents):
                proxy.metrics.rejected.labels("source").inc()
                raise forbidden("source-not-allowed", f"{ip} is not in networks.agents")
            return
        if path.startswith(_OPEN_PATHS):
            return
        if path == "/_proxy/metrics":
            info["direction"] = "control"
            if ip not in proxy.trusted and not _in_networks(ip, proxy.config.networks.upstream):
                raise forbidden("source-not-allowed", f"{ip} may not read metrics")
            return
        if path.startswith(targets.PREFIX) or path.startswith(_CONTROL_PATHS):
            info["direction"] = "southbound" if path.startswith(targets.PREFIX) else "control"
            proxy.check_upstream_source(ip)
            proxy.verify_upstream(req)


class Northbound:
    """Sink: relay an agent's request to the upstream, stamped and signed."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def __call__(self, req: falcon.Request, resp: falcon.Response, **kwargs) -> None:
        proxy, env = self.proxy, req.env
        info = env["agent_proxy.log"]
        ip = info["client_ip"]
        target = proxy.upstream_prefix + raw_target(env)
        info["target"] = req.path
        config = proxy.config
        request_id = info["request_id"] = proxy.request_ids.keep_or_new(env)
        proto = env.get("HTTP_X_FORWARDED_PROTO") if env.get("REMOTE_ADDR") in proxy.trusted else None
        proto = proto if proto in ("http", "https") else env.get("wsgi.url_scheme", "http")
        ts = int(time.time())
        sig = signing.signature(proxy.secret, ts, config.proxy_id, req.method, target, ip)
        for_value = f'"[{ip}]"' if ":" in ip else f'"{ip}"'
        headers = incoming_headers(env, frozenset({"x-request-id"}))
        headers += [
            ("Host", proxy.upstream.authority),
            ("X-Agent-Proxy-Id", config.proxy_id),
            ("X-Agent-Proxy-Client-IP", ip),
            ("X-Agent-Proxy-Signature", f"v1 ts={ts}, sig={sig}"),
            ("Forwarded", f'for={for_value};by="{config.proxy_id}";proto={proto}'),
            ("X-Forwarded-For", ip),
            ("X-Forwarded-Proto", proto),
            ("X-Request-ID", request_id),
        ]
        length = _body_length(req, config)
        info["bytes_in"] = length
        try:
            answer = relay.forward(proxy.cache, proxy.upstream, req.method, target, headers, env["wsgi.input"], length)
        except relay.OriginError as exc:
            raise proxy.origin_failure(info, "upstream", exc) from None
        proxy.state.heard_from_upstream()
        proxy.relay_answer(resp, answer)


class Southbound:
    """Sink: relay a signed upstream request to one agent, after checking the target."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def __call__(self, req: falcon.Request, resp: falcon.Response, **kwargs) -> None:
        proxy, env = self.proxy, req.env
        info = env["agent_proxy.log"]
        target = targets.parse(raw_target(env), proxy.config)
        info["target"] = f"{target.ip}:{target.port}{target.path_and_query.split('?', 1)[0]}"
        request_id = info["request_id"] = proxy.request_ids.keep_or_new(env)
        scheme = "https" if proxy.config.agents.tls else "http"
        origin = relay.Origin(scheme, target.ip, target.port, *proxy.timeouts, proxy.agent_context)
        headers = incoming_headers(env, frozenset({"authorization", "x-request-id"}))
        headers += [("Host", origin.authority), ("X-Request-ID", request_id)]
        length = _body_length(req, proxy.config)
        info["bytes_in"] = length
        try:
            answer = relay.forward(proxy.cache, origin, req.method, target.path_and_query, headers, env["wsgi.input"], length)
        except relay.OriginError as exc:
            raise proxy.origin_failure(info, "agent", exc) from None
        proxy.relay_answer(resp, answer)


def _body_length(req: falcon.Request, config: Config) -> int:
    length = req.content_length or 0
    if length > config.limits.max_body_bytes:
        raise ProxyError(
            413, "body-too-large", "Body too large",
            f"{length} bytes; limits.max_body_bytes is {config.limits.max_body_bytes}",
        )
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
            origin = relay.Origin(
                proxy.upstream.scheme, proxy.upstream.host, proxy.upstream.port,
                min(proxy.upstream.connect_timeout, 2.0), 2.0, 2.0, proxy.upstream.ssl_context,
            )
            try:  # any answer means: reachable; the connection is not kept (a cache of none)
                relay.forward(
                    relay.ConnectionCache(limit=0), origin, "HEAD", (proxy.upstream_prefix or "") + "/",
                    [("Host", origin.authority)], io.BytesIO(), 0,
                )
            except relay.OriginError as exc:
                state.last_probe_error = f"cannot reach the upstream {proxy.config.upstream.url}: {exc}"
                return
            state.heard_from_upstream()
        finally:
            state.probe_lock.release()

    def on_get(self, req, resp):
        state, window = self.proxy.state, self.proxy.config.upstream.ready_window
        if time.monotonic() - state.upstream_heard > window:
            self._probe()
        if state.draining:
            _json(resp, {"status": "draining"}, 503)
        elif time.monotonic() - state.upstream_heard <= window:
            _json(resp, {"status": "ready"})
        else:
            _json(resp, {"status": "not ready", "description": state.last_probe_error}, 503)


def feature_map(config: Config) -> dict:
    """Foreman v2-style features: state, exposed settings and capabilities."""
    return {
        "northbound": {
            "state": "running",
            "settings": {"upstream_url": config.upstream.url, "proxy_id": config.proxy_id},
            "capabilities": ["hmac-sha256", "streaming", "chunked-requests"],
        },
        "southbound": {
            "state": "running",
            "settings": {
                "agent_networks": [str(n) for n in config.networks.agents],
                "agent_ports": list(config.agents.ports),
                "agent_tls": config.agents.tls,
            },
            "capabilities": ["hmac-sha256", "streaming"],
        },
        "registration": {
            "state": "running" if config.public_url else "disabled",
            "settings": {"public_url": config.public_url},
            "capabilities": ["handshake-v1"],
        },
        "metrics": {
            "state": "running",
            "settings": {"path": "/_proxy/metrics"},
            "capabilities": ["prometheus-text"],
        },
    }


class Features:
    def __init__(self, config: Config):
        self.running = [name for name, f in feature_map(config).items() if f["state"] == "running"]

    def on_get(self, req, resp):
        _json(resp, self.running)


class FeaturesV2:
    def __init__(self, config: Config):
        self.features = feature_map(config)

    def on_get(self, req, resp):
        _json(resp, self.features)


class Handshake:
    """The upstream checks that this proxy holds the secret: sign its nonce back."""

    def __init__(self, proxy: Proxy, features: Features):
        self.proxy = proxy
        self.features = features

    def on_post(self, req, resp):
        length = req.content_length or 0
        try:
            data = json.loads(req.bounded_stream.read(min(length, 4096)) or b"null")
        except ValueError:
            data = None
        nonce = data.get("nonce") if isinstance(data, dict) else None
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise ProxyError(400, "bad-nonce", "Bad handshake", 'body must be {"nonce": "<8-256 URL-safe characters>"}')
        config = self.proxy.config
        resp.set_header(
            "X-Agent-Proxy-Signature",
            signing.signature_header(self.proxy.secret, config.proxy_id, signing.HANDSHAKE_METHOD, nonce),
        )
        _json(resp, {"proxy_id": config.proxy_id, "version": __version__, "nonce": nonce, "features": self.features.running})


class MetricsResource:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def on_get(self, req, resp):
        resp.content_type = self.metrics.content_type
        resp.data = self.metrics.render()


# -- the WSGI layer: access log, metrics, in-flight bound


class Worker:
    """The WSGI callable waitress serves: counts, logs and bounds every request."""

    def __init__(self, falcon_app: falcon.App, proxy: Proxy):
        self.falcon_app = falcon_app
        self.proxy = proxy

    def __call__(self, env, start_response):
        proxy, state = self.proxy, self.proxy.state
        started = time.perf_counter()
        info = env["agent_proxy.log"] = {"direction": "local", "client_ip": env.get("REMOTE_ADDR", ""), "bytes_in": 0}
        with state.lock:
            state.in_flight += 1
        if rejecting() and not env.get("PATH_INFO", "").startswith(_OPEN_PATHS):
            self._leave()
            proxy.metrics.rejected.labels("overload").inc()
            start_response("503 Service Unavailable", [
                ("Content-Type", "application/json"), (ERROR_HEADER, "overloaded"), ("Retry-After", "1"),
            ])
            return [b'{"title": "Overloaded", "description": "limits.max_in_flight requests are in flight"}']
        status_holder = []

        def recording_start_response(status, headers, exc_info=None):
            status_holder.append(status)
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
        self.proxy.metrics.observe(info["direction"], status, duration, info["bytes_in"], sent)
        access_log = self.proxy.access_log
        if access_log.enabled:
            access_log.write({
                "request_id": info.get("request_id", ""),
                "direction": info["direction"],
                "client_ip": info["client_ip"],
                "method": env.get("REQUEST_METHOD"),
                "target": info.get("target") or env.get("PATH_INFO", ""),
                "status": status,
                "bytes_in": info["bytes_in"],
                "bytes_out": sent,
                "duration_ms": round(duration * 1000, 3),
                "outcome": info.get("outcome", "complete"),
            })


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
                error = proxy.origin_failure(info, "agent" if info["direction"] == "southbound" else "upstream", exc)
                data = error_body(error.title, error.description)
                self._start_response(f"{error.status} {http.HTTPStatus(error.status).phrase}", [
                    ("Content-Type", "application/json"), (ERROR_HEADER, error.code), ("Content-Length", str(len(data))),
                ], sys.exc_info())
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


def create_app(
    config: Config, secret: bytes, state: WorkerState | None = None, metrics: Metrics | None = None,
    control_port: int | None = None, access_lines: LineWriter | None = None,
) -> Worker:
    """Build the worker's WSGI application for ``config``; nothing is shared between calls.

    ``control_port``: the port of the separate control listener (``listen_control``), if any.
    ``access_lines``: where access log lines go (a worker's ``LineBatch``, written by its
    main loop); without it, each line is written to stdout by the thread that served it.
    """
    state = state or WorkerState()
    metrics = metrics or Metrics()
    proxy = Proxy(config, secret, state, metrics, access_lines)
    app = falcon.App(middleware=[Guard(proxy, control_port)], media_type=None)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_error_handler(ProxyError, handle_proxy_error)
    app.set_error_serializer(serialize_falcon_error)

    features = Features(config)
    app.add_route("/_proxy/health", Health(state))
    app.add_route("/_proxy/ready", Ready(proxy))
    app.add_route("/_proxy/features", features)
    app.add_route("/_proxy/v2/features", FeaturesV2(config))
    app.add_route("/_proxy/handshake", Handshake(proxy, features))
    app.add_route("/_proxy/metrics", MetricsResource(metrics))
    # Routes take precedence over sinks; any other /_proxy/ path is a 404, never relayed.
    app.add_sink(Southbound(proxy), prefix=r"^/_proxy/agents/")
    app.add_sink(Northbound(proxy), prefix=r"^/(?!_proxy/)")
    return Worker(app, proxy)
