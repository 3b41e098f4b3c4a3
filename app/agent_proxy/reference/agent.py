"""The reference agent: handshakes, checks in, and runs only commands signed with its token.

    python -m agent_proxy.reference.agent --endpoint https://10.1.2.3:2002 --insecure

It talks to its endpoint (the proxy) exactly as it would talk to the control plane. At
start it chooses a random token (or reads it from --state-file) and hands it over in its
handshake; the control plane signs every command with that token, so a command that the
proxy, or anyone else, altered or made up is refused. See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import falcon

from ..tlsutil import self_signed
from . import commands
from .common import CallError, call, client_context, fail, host_port, log_event, make_server, server_context, url_path

COMMAND_SKEW = 300


def _log(event: str, **fields) -> None:
    log_event("agent", event, **fields)


@dataclass
class AgentState:
    instance_id: str
    token: str
    ip: str = ""
    started: float = field(default_factory=time.monotonic)
    handshakes: int = 0
    checkins: int = 0
    executed: int = 0
    rejected: int = 0
    seen: dict = field(default_factory=dict)  # command signature -> its timestamp, for replay checks
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self) -> dict:
        with self.lock:
            return {
                "instance_id": self.instance_id, "ip": self.ip,
                "uptime_seconds": round(time.monotonic() - self.started, 1),
                "handshakes": self.handshakes, "checkins": self.checkins,
                "commands_executed": self.executed, "commands_rejected": self.rejected,
            }


# -- the agent port


class Commands:
    """POST /agent/v1/commands: verify the signature, then run one of a fixed, harmless set."""

    def __init__(self, state: AgentState, skew: int = COMMAND_SKEW):
        self.state = state
        self.skew = skew
        self.runners = {"echo": lambda args: args, "report": lambda args: self.state.report()}

    def _reject(self, status: int, title: str, reason: str) -> falcon.HTTPError:
        with self.state.lock:
            self.state.rejected += 1
        _log("command-rejected", status=status, reason=reason)
        return falcon.HTTPError(status, title=title, description=reason)

    def on_post(self, req, resp):
        body = req.bounded_stream.read(65536)
        state = self.state
        try:
            sig = commands.verify(req.get_header(commands.HEADER), state.token, state.instance_id, body, self.skew)
        except commands.CommandSignatureError as exc:
            raise self._reject(401, "Signature refused", str(exc)) from None
        now = time.time()
        with state.lock:
            state.seen = {s: ts for s, ts in state.seen.items() if now - ts <= 2 * self.skew}
            replayed = sig in state.seen
            state.seen[sig] = now
        if replayed:
            raise self._reject(401, "Signature refused", "this signed command was already received (replay)")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("instance_id") != state.instance_id:
            raise self._reject(400, "Bad command", "body must be a JSON object for this instance_id")
        name = data.get("command")
        runner = self.runners.get(name)
        if runner is None:
            raise self._reject(400, "Unknown command", f"{name!r} is not one of {', '.join(sorted(self.runners))}")
        with state.lock:
            state.executed += 1
        result = runner(data.get("args"))
        _log("command", command=name, instance_id=state.instance_id)
        resp.media = {"instance_id": state.instance_id, "command": name, "result": result}


def create_app(state: AgentState, skew: int = COMMAND_SKEW) -> falcon.App:
    app = falcon.App()
    app.add_route("/agent/v1/commands", Commands(state, skew))
    return app


# -- talking to the endpoint


def backoff_delay(failures: int, base: float, maximum: float, rng: random.Random = random) -> float:
    """Jittered exponential backoff: up to base * 2^(failures-1), capped at ``maximum``, at least half of it."""
    ceiling = min(maximum, base * 2 ** max(failures - 1, 0))
    return rng.uniform(ceiling / 2, ceiling)


def own_ip(endpoint: str) -> str:
    """The address this host uses towards the endpoint (no packet is sent)."""
    parts = urlsplit(endpoint)
    try:
        family = socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((parts.hostname, parts.port or 443))
            return probe.getsockname()[0]
    except OSError:
        return ""


class CheckIns:
    """Handshake, then check in every ``interval``; back off while the endpoint fails."""

    def __init__(self, state: AgentState, endpoint: str, port: int, interval: float, max_backoff: float,
                 context: ssl.SSLContext | None):
        self.state, self.endpoint, self.port = state, endpoint.rstrip("/"), port
        self.interval, self.max_backoff, self.context = interval, max_backoff, context
        self.prefix = url_path(endpoint)
        self.stop = threading.Event()

    def _post(self, path: str, data: dict):
        return call(self.endpoint, "POST", self.prefix + path, json.dumps(data).encode(), context=self.context, timeout=10)

    def handshake(self) -> None:
        state = self.state
        state.ip = own_ip(self.endpoint) or state.ip
        answer = self._post("/agent/v1/handshake", {
            "instance_id": state.instance_id, "token": state.token, "ip": state.ip, "port": self.port,
        })
        if answer.status != 200:
            raise CallError(f"handshake answered {answer.status}: {answer.body[:200].decode('utf-8', 'replace')}")
        with state.lock:
            state.handshakes += 1
        _log("handshake", endpoint=self.endpoint, instance_id=state.instance_id, ip=state.ip, answer=answer.json())

    def checkin(self) -> bool:
        """True when checked in; False when the endpoint does not know us (handshake again)."""
        answer = self._post("/agent/v1/checkin", {"instance_id": self.state.instance_id})
        if answer.status == 404:
            _log("checkin-unknown", endpoint=self.endpoint, note="handshaking again")
            return False
        if answer.status != 200:
            raise CallError(f"check-in answered {answer.status}: {answer.body[:200].decode('utf-8', 'replace')}")
        with self.state.lock:
            self.state.checkins += 1
        _log("checkin", endpoint=self.endpoint, count=self.state.checkins)
        return True

    def run(self) -> None:
        failures, shaken = 0, False
        while not self.stop.is_set():
            try:
                if not shaken:
                    self.handshake()
                    shaken = True
                else:
                    shaken = self.checkin()
                    if not shaken:
                        continue
                failures, delay = 0, self.interval
            except CallError as exc:
                failures += 1
                delay = backoff_delay(failures, min(1.0, self.interval), self.max_backoff)
                _log("backoff", endpoint=self.endpoint, failures=failures, retry_in=round(delay, 2), reason=str(exc))
            self.stop.wait(delay)


# -- command line


def _load_state(path: str | None, instance_id: str | None) -> AgentState:
    saved = {}
    if path and os.path.exists(path):
        try:
            saved = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            fail(f"--state-file {path}: cannot read it: {exc}")
    state = AgentState(
        instance_id=instance_id or saved.get("instance_id") or f"agent-{secrets.token_hex(4)}",
        token=saved.get("token") or secrets.token_urlsafe(32),
    )
    if path:
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"instance_id": state.instance_id, "token": state.token}, handle)
        os.replace(path + ".tmp", path)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_proxy.reference.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", required=True, help="the proxy, e.g. https://10.1.2.3:2002")
    parser.add_argument("--listen", default="0.0.0.0:2003", help="HOST:PORT of the agent port (default %(default)s)")
    parser.add_argument("--instance-id", help="default: from --state-file, else agent-<random>")
    parser.add_argument("--checkin-interval", type=float, default=30.0, help="seconds (default %(default)s)")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="seconds (default %(default)s)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--ca-file", help="CA to verify the endpoint's TLS with (default: system CAs)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the endpoint's TLS")
    parser.add_argument("--state-file", help="keeps instance id and token across restarts")
    args = parser.parse_args(argv)

    parts = urlsplit(args.endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    if args.checkin_interval <= 0 or args.max_backoff <= 0:
        fail("--checkin-interval and --max-backoff must be positive")
    try:
        host, port = host_port(args.listen)
    except ValueError as exc:
        fail(str(exc))
    if args.ca_file and not os.access(args.ca_file, os.R_OK):
        fail(f"--ca-file: cannot read {args.ca_file}")
    state = _load_state(args.state_file, args.instance_id)

    with tempfile.TemporaryDirectory(prefix="reference-agent-") as scratch:
        names = [state.instance_id] + ([host] if host not in ("0.0.0.0", "::") else [])
        cert_pem, key_pem = self_signed(state.instance_id, names)
        cert_file, key_file = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
        open(cert_file, "wb").write(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key_pem)
        try:
            server = make_server(create_app(state), host, port, server_context(cert_file, key_file))
        except OSError as exc:
            fail(f"cannot listen on {args.listen}: {exc.strerror}")

    context = client_context(args.ca_file, verify=not args.insecure) if parts.scheme == "https" else None
    checkins = CheckIns(state, args.endpoint, port, args.checkin_interval, args.max_backoff, context)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _log("listening", address=f"https://{args.listen}", instance_id=state.instance_id, endpoint=args.endpoint)
    threading.Thread(target=checkins.run, name="checkins", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        checkins.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
