"""The reference control plane: registration, the agent API, and an operator API.

    python -m agent_proxy.reference.upstream --listen 127.0.0.1:3302 --self-signed 127.0.0.1 \\
        --write-cert upstream.crt --proxy site-a=site-a.psk

It holds one shared secret per proxy_id (two while that secret is rotated) and keeps
everything else in memory. Agents are
keyed by (proxy_id, client IP as the proxy saw it, instance id): that is how two agents
both at 10.0.0.2 behind two proxies stay apart. See README.md for the endpoints.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import falcon

from .. import signing
from ..tlsutil import fingerprint_der, self_signed
from . import commands
from .common import CallError, call, client_context, fail, host_port, log_event, make_server, server_context, url_path

_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _log(event: str, **fields) -> None:
    log_event("upstream", event, **fields)


@dataclass(frozen=True)
class Settings:
    # proxy_id -> its secrets: bytes, or a tuple of them while the secret is rotated. Every
    # one is accepted on the proxy's signatures; calls to the proxy are signed with the
    # first, and with the next when the proxy refuses that signature (a node that does not
    # have the new secret yet).
    secrets: dict
    skew: int = 300
    proxy_context: ssl.SSLContext | None = None  # how proxies' TLS is verified; None: system CAs
    allow_token_override: bool = False
    operator_networks: tuple = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    # Features every proxy should run; sent back on registration so the proxy can warn.
    expected_features: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "secrets", {
            proxy_id: (value,) if isinstance(value, bytes) else tuple(value) for proxy_id, value in self.secrets.items()
        })


@dataclass
class Registry:
    """Registered proxies and known agents, in memory."""

    proxies: dict = field(default_factory=dict)  # proxy_id -> record
    agents: dict = field(default_factory=dict)  # (proxy_id, ip, instance_id) -> record
    lock: threading.Lock = field(default_factory=threading.Lock)


def _raw_target(env: dict) -> str:
    target = env.get("RAW_URI") or env.get("REQUEST_URI")
    if target is None:  # falcon.testing: rebuild it
        query = env.get("QUERY_STRING")
        target = env.get("PATH_INFO", "/") + (f"?{query}" if query else "")
    return target


def _json_body(req: falcon.Request) -> dict:
    try:
        data = json.loads(req.bounded_stream.read(65536) or b"null")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise falcon.HTTPBadRequest(title="Bad request", description="the body must be a JSON object")
    return data


def _field(data: dict, name: str, pattern: re.Pattern | None = None) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
        raise falcon.HTTPBadRequest(title="Bad request", description=f"{name!r} is missing or malformed")
    return value


def _json(resp: falcon.Response, data, status: int = 200) -> None:
    resp.status = status
    resp.media = data


def call_proxy(caller: Callable, settings: Settings, proxy_id: str, url: str, path: str, body: bytes,
               headers: dict, timeout: float, method: str = "POST"):
    """Call a proxy signed with proxy_id's first secret, and with the next one while the
    proxy refuses the signature (it refuses before it acts, so trying again is safe).
    Returns (answer, the secret it accepted or the last one tried)."""
    for secret in settings.secrets[proxy_id]:
        signed = {**headers, "Authorization": signing.authorization(secret, proxy_id, method, path)}
        answer = caller(url, method, path, body, signed, context=settings.proxy_context, timeout=timeout)
        if answer.status != 401 or answer.headers.get("x-agent-proxy-error") != "bad-signature":
            break
    return answer, secret


class ProxyAuth:
    """Checks the X-Agent-Proxy-Signature that a proxy puts on every call it makes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def verify(self, req: falcon.Request, client_ip: str) -> str:
        proxy_id = req.get_header("X-Agent-Proxy-Id") or ""
        try:
            if proxy_id not in self.settings.secrets:
                raise signing.SignatureError(f"unknown proxy_id {proxy_id!r}" if proxy_id else "missing X-Agent-Proxy-Id")
            refusals = []
            for secret in self.settings.secrets[proxy_id]:  # any of them, while rotating
                try:
                    signing.verify_signature_header(
                        req.get_header("X-Agent-Proxy-Signature"), secret, proxy_id, req.method,
                        _raw_target(req.env), client_ip, self.settings.skew,
                    )
                    break
                except signing.SignatureError as exc:
                    refusals.append(exc)
            else:
                raise refusals[0]
        except signing.SignatureError as exc:
            _log("signature-rejected", path=req.path, proxy_id=proxy_id, reason=str(exc))
            raise falcon.HTTPUnauthorized(title="Signature refused", description=str(exc)) from None
        return proxy_id

    def verify_agent_call(self, req: falcon.Request) -> tuple[str, str]:
        """An agent's call relayed by a proxy: (proxy_id, the agent's IP as the proxy saw it)."""
        client_ip = req.get_header("X-Agent-Proxy-Client-IP") or ""
        proxy_id = self.verify(req, client_ip)
        if not client_ip:
            raise falcon.HTTPUnauthorized(title="Signature refused", description="missing X-Agent-Proxy-Client-IP")
        return proxy_id, client_ip


# -- registration


class AgentProxies:
    """POST: register (or refresh) a proxy after a signed handshake back to its URL."""

    def __init__(self, settings: Settings, registry: Registry, auth: ProxyAuth, caller: Callable):
        self.settings, self.registry, self.auth, self.call = settings, registry, auth, caller

    def on_post(self, req, resp):
        proxy_id = self.auth.verify(req, client_ip="")
        data = _json_body(req)
        if data.get("proxy_id") != proxy_id:
            raise falcon.HTTPBadRequest(title="Bad request", description="body proxy_id differs from X-Agent-Proxy-Id")
        url = _field(data, "url").rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise falcon.HTTPBadRequest(title="Bad request", description=f"url must be http(s)://host[:port], got {url!r}")
        features, certificate = self._handshake(proxy_id, url)
        states = self._feature_states(proxy_id, url)
        record = {
            "proxy_id": proxy_id, "url": url, "version": data.get("version"),
            "features": features, "feature_states": states,
            "expected_features": list(self.settings.expected_features), "registered_at": time.time(),
            "certificate_sha256": certificate,
        }
        with self.registry.lock:
            known = proxy_id in self.registry.proxies
            self.registry.proxies[proxy_id] = record
        _log("registered", proxy_id=proxy_id, url=url, again=known, features=features, certificate_sha256=certificate)
        _json(resp, record, 200 if known else 201)

    def _handshake(self, proxy_id: str, url: str) -> tuple[list, str | None]:
        """The proxy's features and the SHA-256 fingerprint of the certificate it answered with."""
        nonce = secrets.token_urlsafe(24)
        path = url_path(url) + "/_proxy/handshake"

        def failed(reason: str) -> falcon.HTTPError:
            _log("handshake-failed", proxy_id=proxy_id, url=url, reason=reason)
            return falcon.HTTPBadGateway(title="Handshake failed", description=reason)

        try:
            answer, secret = call_proxy(self.call, self.settings, proxy_id, url, path,
                                        json.dumps({"nonce": nonce}).encode(), {}, timeout=10)
        except CallError as exc:
            raise failed(str(exc)) from None
        if answer.status != 200:
            detail = answer.json()
            detail = detail if isinstance(detail, dict) else {}
            said = ": ".join(str(detail[k]) for k in ("title", "description") if detail.get(k))
            raise failed(f"the proxy at {url} answered {answer.status}{': ' + said if said else ''}")
        try:
            signing.verify_signature_header(
                answer.headers.get("x-agent-proxy-signature"), secret, proxy_id,
                signing.HANDSHAKE_METHOD, nonce, "", self.settings.skew,
            )
        except signing.SignatureError as exc:
            raise failed(f"the proxy at {url} signed its answer wrongly: {exc}") from None
        body = answer.json()
        if not isinstance(body, dict) or body.get("nonce") != nonce or body.get("proxy_id") != proxy_id:
            raise failed(f"the answer of the proxy at {url} does not carry our nonce and its proxy_id")
        features = body.get("features")
        certificate = fingerprint_der(answer.certificate) if answer.certificate else None
        return (features if isinstance(features, list) else []), certificate

    def _feature_states(self, proxy_id: str, url: str) -> dict | None:
        """The proxy's v2 answer (state, settings, capabilities per feature), as Foreman keeps it.

        A proxy without /_proxy/v2/features (404) is asked for the classic /_proxy/features
        list instead: every listed feature counts as running, with no settings. None when
        neither answers.
        """
        for path, signed in (("/_proxy/v2/features", True), ("/_proxy/features", False)):
            target = url_path(url) + path
            try:
                if signed:
                    answer, _ = call_proxy(self.call, self.settings, proxy_id, url, target, b"", {}, 10, "GET")
                else:
                    answer = self.call(url, "GET", target, b"", {}, context=self.settings.proxy_context, timeout=10)
            except CallError as exc:
                _log("features-unavailable", proxy_id=proxy_id, url=url, reason=str(exc))
                return None
            body = answer.json() if answer.status == 200 else None
            if isinstance(body, dict):
                return body
            if isinstance(body, list):
                return {str(name): {"state": "running", "settings": {}, "capabilities": []} for name in body}
            if answer.status != 404:
                _log("features-unavailable", proxy_id=proxy_id, url=url, reason=f"{path} answered {answer.status}")
                return None
        return None


class AgentProxy:
    """DELETE: deregister."""

    def __init__(self, registry: Registry, auth: ProxyAuth):
        self.registry, self.auth = registry, auth

    def on_delete(self, req, resp, proxy_id):
        signed_by = self.auth.verify(req, client_ip="")
        if signed_by != proxy_id:
            raise falcon.HTTPForbidden(title="Forbidden", description=f"{signed_by} may not deregister {proxy_id}")
        with self.registry.lock:
            record = self.registry.proxies.pop(proxy_id, None)
        if record is None:
            raise falcon.HTTPNotFound(title="Not registered", description=f"proxy {proxy_id} is not registered")
        _log("deregistered", proxy_id=proxy_id)
        resp.status = 204


# -- the agent API (always reached through a proxy)


class AgentHandshake:
    def __init__(self, registry: Registry, auth: ProxyAuth):
        self.registry, self.auth = registry, auth

    def on_post(self, req, resp):
        proxy_id, ip = self.auth.verify_agent_call(req)
        data = _json_body(req)
        instance_id = _field(data, "instance_id", _INSTANCE_ID_RE)
        token = _field(data, "token")
        if len(token) < 16:
            raise falcon.HTTPBadRequest(title="Bad request", description="token must have at least 16 characters")
        port = data.get("port", 2003)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise falcon.HTTPBadRequest(title="Bad request", description="port must be a TCP port")
        key = (proxy_id, ip, instance_id)
        now = time.time()
        with self.registry.lock:
            record = self.registry.agents.get(key) or {"first_seen": now, "checkins": 0, "handshakes": 0}
            record.update(
                proxy_id=proxy_id, ip=ip, instance_id=instance_id, token=token, port=port,
                reported_ip=data.get("ip"), last_seen=now, handshakes=record["handshakes"] + 1,
            )
            self.registry.agents[key] = record
        _log("agent-handshake", proxy_id=proxy_id, ip=ip, instance_id=instance_id, reported_ip=data.get("ip"))
        _json(resp, {"status": "ok", "proxy_id": proxy_id, "ip": ip, "instance_id": instance_id})


class AgentCheckin:
    def __init__(self, registry: Registry, auth: ProxyAuth):
        self.registry, self.auth = registry, auth

    def on_post(self, req, resp):
        proxy_id, ip = self.auth.verify_agent_call(req)
        instance_id = _field(_json_body(req), "instance_id", _INSTANCE_ID_RE)
        with self.registry.lock:
            record = self.registry.agents.get((proxy_id, ip, instance_id))
            if record is not None:
                record["checkins"] += 1
                record["last_seen"] = time.time()
        if record is None:
            raise falcon.HTTPNotFound(title="Unknown agent", description="no handshake from this agent yet; handshake first")
        _log("agent-checkin", proxy_id=proxy_id, ip=ip, instance_id=instance_id, checkins=record["checkins"])
        _json(resp, {"status": "ok", "checkins": record["checkins"]})


# -- the operator API


class OperatorSources:
    """Middleware: the operator API answers only sources in --operator-network."""

    def __init__(self, networks: tuple):
        self.networks = networks

    def process_request(self, req, resp):
        if not req.path.startswith("/operator/"):
            return
        try:
            addr = ipaddress.ip_address(req.remote_addr)
        except ValueError:
            addr = None
        if addr is None or not any(addr.version == n.version and addr in n for n in self.networks):
            raise falcon.HTTPForbidden(title="Forbidden", description=f"{req.remote_addr} may not use the operator API")


class OperatorProxies:
    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req, resp):
        with self.registry.lock:
            _json(resp, sorted(self.registry.proxies.values(), key=lambda r: r["proxy_id"]))


class OperatorAgents:
    def __init__(self, registry: Registry):
        self.registry = registry

    def on_get(self, req, resp):
        with self.registry.lock:
            agents = [{k: v for k, v in r.items() if k != "token"} for r in self.registry.agents.values()]
        _json(resp, sorted(agents, key=lambda r: (r["proxy_id"], r["ip"], r["instance_id"])))


class OperatorCommands:
    """POST: sign a command with the agent's token and send it through that agent's proxy."""

    def __init__(self, settings: Settings, registry: Registry, caller: Callable):
        self.settings, self.registry, self.call = settings, registry, caller

    def on_post(self, req, resp):
        data = _json_body(req)
        proxy_id = _field(data, "proxy_id")
        agent_ip = _field(data, "agent_ip")
        command = _field(data, "command")
        instance_id = data.get("instance_id")
        override = data.get("token_override")
        if override is not None and not self.settings.allow_token_override:
            raise falcon.HTTPBadRequest(title="Bad request", description="token_override needs --allow-token-override")
        with self.registry.lock:
            proxy = self.registry.proxies.get(proxy_id)
            candidates = [
                dict(r) for (p, ip, iid), r in self.registry.agents.items()
                if p == proxy_id and ip == agent_ip and instance_id in (None, iid)
            ]
        if proxy is None:
            raise falcon.HTTPNotFound(title="Unknown proxy", description=f"proxy {proxy_id} is not registered")
        if len(candidates) != 1:
            what = "no agent" if not candidates else "several agents (give instance_id)"
            raise falcon.HTTPNotFound(title="Unknown agent", description=f"{what} at {agent_ip} behind {proxy_id}")
        agent = candidates[0]
        body = json.dumps({"instance_id": agent["instance_id"], "command": command, "args": data.get("args")}).encode()
        url = proxy["url"]
        path = url_path(url) + f"/_proxy/agents/{agent_ip}/{agent['port']}/agent/v1/commands"
        headers = {commands.HEADER: commands.sign(override or agent["token"], agent["instance_id"], body)}
        try:
            answer, _ = call_proxy(self.call, self.settings, proxy_id, url, path, body, headers, timeout=15)
        except CallError as exc:
            raise falcon.HTTPBadGateway(title="Proxy unreachable", description=str(exc)) from None
        agent_body = answer.json()
        _log("command", proxy_id=proxy_id, ip=agent_ip, instance_id=agent["instance_id"], command=command,
             agent_status=answer.status, override=override is not None)
        _json(resp, {
            "agent_status": answer.status,
            "agent_body": agent_body if agent_body is not None else answer.body.decode("utf-8", "replace"),
            "proxy_error": answer.headers.get("x-agent-proxy-error"),
        })


class Root:
    def on_get(self, req, resp):
        _json(resp, {"service": "agent-proxy reference upstream"})

    on_head = on_get


def create_app(settings: Settings, registry: Registry | None = None, caller: Callable = call) -> falcon.App:
    """The control plane's WSGI app; ``caller`` makes its outgoing calls (to proxies)."""
    registry = registry if registry is not None else Registry()
    auth = ProxyAuth(settings)
    app = falcon.App(middleware=[OperatorSources(settings.operator_networks)])
    app.add_route("/", Root())
    app.add_route("/api/v1/agent-proxies", AgentProxies(settings, registry, auth, caller))
    app.add_route("/api/v1/agent-proxies/{proxy_id}", AgentProxy(registry, auth))
    app.add_route("/agent/v1/handshake", AgentHandshake(registry, auth))
    app.add_route("/agent/v1/checkin", AgentCheckin(registry, auth))
    app.add_route("/operator/v1/proxies", OperatorProxies(registry))
    app.add_route("/operator/v1/agents", OperatorAgents(registry))
    app.add_route("/operator/v1/commands", OperatorCommands(settings, registry, caller))
    return app


# -- command line


def _read_secret(spec: str) -> tuple[str, bytes]:
    proxy_id, sep, path = spec.partition("=")
    if not sep or not proxy_id or not path:
        fail(f"--proxy {spec!r}: expected PROXY_ID=SECRET_FILE")
    try:
        secret = open(path, encoding="utf-8").read().strip()
    except OSError as exc:
        fail(f"--proxy {spec!r}: cannot read {path}: {exc.strerror}")
    if len(secret) < 16:
        fail(f"--proxy {spec!r}: {path} holds fewer than 16 characters")
    return proxy_id, secret.encode()


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upstream-cert-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_proxy.reference.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:3302", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--cert", help="certificate (PEM)")
    parser.add_argument("--key", help="private key (PEM)")
    parser.add_argument("--self-signed", action="append", metavar="NAME", help="generate a certificate for NAME (repeatable)")
    parser.add_argument("--write-cert", metavar="FILE", help="with --self-signed: write the certificate here")
    parser.add_argument("--proxy", action="append", default=[], metavar="ID=FILE",
                        help="a proxy_id and its shared secret file; the same ID twice while rotating (the first signs)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--proxy-ca", metavar="FILE", help="CA to verify proxies' TLS with")
    tls.add_argument("--insecure-proxy-tls", action="store_true", help="do not verify proxies' TLS (labs only)")
    parser.add_argument("--skew", type=int, default=300, help="accepted clock skew, seconds (default %(default)s)")
    parser.add_argument("--operator-network", action="append", metavar="CIDR", help="sources allowed on /operator/v1/*")
    parser.add_argument("--allow-token-override", action="store_true", help="test/demo aid: commands may carry token_override")
    parser.add_argument("--expect-feature", action="append", default=[], metavar="NAME",
                        help="a feature every proxy should run (repeatable); registration answers say so")
    args = parser.parse_args(argv)

    try:
        host, port = host_port(args.listen)
        networks = tuple(ipaddress.ip_network(n) for n in args.operator_network or ["127.0.0.0/8", "::1/128"])
    except ValueError as exc:
        fail(str(exc))
    if bool(args.cert) != bool(args.key) or bool(args.cert) == bool(args.self_signed):
        fail("give either --cert and --key, or --self-signed NAME")
    if args.write_cert and not args.self_signed:
        fail("--write-cert goes with --self-signed")
    if not args.proxy:
        fail("give at least one --proxy PROXY_ID=SECRET_FILE")
    if args.proxy_ca and not os.access(args.proxy_ca, os.R_OK):
        fail(f"--proxy-ca: cannot read {args.proxy_ca}")

    with tempfile.TemporaryDirectory(prefix="reference-upstream-") as scratch:
        cert_file, key_file = args.cert, args.key
        if args.self_signed:
            cert_pem, key_pem = self_signed(args.self_signed[0], args.self_signed)
            cert_file, key_file = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
            open(cert_file, "wb").write(cert_pem)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_pem)
            if args.write_cert:
                _write_atomically(args.write_cert, cert_pem)
        try:
            context = server_context(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            fail(f"cannot load the certificate and key: {exc}")

        held: dict = {}
        for spec in args.proxy:  # a proxy_id given twice: its secret is being rotated
            proxy_id, secret = _read_secret(spec)
            held.setdefault(proxy_id, []).append(secret)
        settings = Settings(
            secrets=held,
            skew=args.skew,
            proxy_context=client_context(args.proxy_ca, verify=not args.insecure_proxy_tls),
            allow_token_override=args.allow_token_override,
            operator_networks=networks,
            expected_features=tuple(args.expect_feature),
        )
        try:
            server = make_server(create_app(settings), host, port, context)
        except OSError as exc:
            fail(f"cannot listen on {args.listen}: {exc.strerror}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _log("listening", address=f"https://{args.listen}", proxies=sorted(settings.secrets),
         token_override=args.allow_token_override)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
