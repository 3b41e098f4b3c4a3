"""The configuration file, parsed once into a typed, immutable object.

Every section is a frozen dataclass; each field carries its default and, where the type
alone does not say enough, a check. Unknown keys are errors. Every error names the key
and the file, and all problems are reported together, one line each.

Environment variables ``AGENT_PROXY_<SECTION>__<KEY>`` override the file (values are
read as YAML scalars or flow sequences, so ``AGENT_PROXY_LIMITS__THREADS=8`` is an int and
``AGENT_PROXY_NETWORKS__AGENTS=[10.0.0.0/24]`` a list).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from .hostport import is_host_name

DEFAULT_PATH = "/etc/agent-proxy/agent-proxy.yaml"
ENV_PREFIX = "AGENT_PROXY_"
PROXY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")   # the whole value: fullmatch
MIN_SECRET_LENGTH = 32  # characters; `agent-proxy init` makes 64 hex digits
MAX_SECONDS = 86400     # no wait, timeout or window in the config is longer than a day

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(Exception):
    """One or more problems with a configuration; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# -- value checks: each takes the raw value and returns the typed one or raises ValueError


def _int(minimum: int, maximum: int | None = None):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {shown(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}, got {shown(value)}")
        return value

    return check


def _seconds(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 0 < value <= MAX_SECONDS):
        raise ValueError(f"must be a number of seconds, more than 0 and at most {MAX_SECONDS}, got {shown(value)}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _optional(check):
    def optional(value: Any):
        return None if value is None else check(value)

    return optional


def _readable_file(value: Any) -> str:
    path = _str(value)
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise ValueError(f"cannot read file {path}")
    return path


def _path(value: Any) -> str:
    # Files that `init` creates or that only the running service needs are checked
    # where they are used, not here, so that check-config works before `init`.
    return _str(value)


def _proxy_id(value: Any) -> str:
    if not isinstance(value, str) or not PROXY_ID_RE.fullmatch(value):
        raise ValueError(f"must match [A-Za-z0-9._-]{{1,64}}, got {shown(value)}")
    return value


# A base path on the upstream: RFC 3986's unreserved characters and slashes. Both node
# modes put it into every request line, and the native front into its HAProxy config.
_URL_PATH = re.compile(r"[A-Za-z0-9._~/-]*")


def _url(value: Any) -> str:
    text = _str(value)
    if re.search(r"[\x00-\x20\x7f-\U0010ffff]", text):
        raise ValueError(f"must not contain spaces, control or non-ASCII characters, got {shown(text)}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:  # urlsplit's own reasons: "Port out of range 0-65535", ...
        raise ValueError(f"is not a valid URL ({exc}), got {shown(text)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {shown(text)}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"must not carry credentials, a query or a fragment, got {shown(text)}")
    host, bracketed = parts.hostname, parts.netloc.startswith("[")
    if not (is_address(host) and ":" in host if bracketed else is_host(host)):
        raise ValueError(f"has a host that is neither an IP address ([...] for IPv6) nor a host name, got {shown(text)}")
    if port == 0:
        raise ValueError(f"has port 0, got {shown(text)}")
    if not _URL_PATH.fullmatch(parts.path):
        raise ValueError(f"has a path with characters other than letters, digits, -._~ and /, got {shown(text)}")
    return text.rstrip("/")


def _list_of(check):
    def checked(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {value!r}")
        return tuple(check(item) for item in value)

    return checked


def _network(value: Any) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        # ipaddress says why, e.g. "10.0.0.1/8 has host bits set"
        raise ValueError(f"is not a valid CIDR network: {exc}") from None


def _address(value: Any) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise ValueError(f"is not an IP address: {exc}") from None


def _host(value: Any) -> str:
    text = _str(value)
    if not is_host(text):
        raise ValueError(f"is not an IP address or host name: {shown(text)}")
    return text


def shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error line quotes it: repr, cut short past ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_host(text: str) -> bool:
    """Is ``text`` an IP address or a host name (hostport.is_host_name)?"""
    return is_address(text) or is_host_name(text)


def is_address(text: str) -> bool:
    """Is ``text`` an IP address (not a host name)?"""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port(value: Any) -> int:
    return _int(1, 65535)(value)


def _choice(*choices: str):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _setting(default: Any, check, restart: str | None = None) -> Any:
    """A dataclass field with its default and its check.

    ``restart``: why a running worker cannot apply a new value on reload (SIGHUP), so that
    it needs a restart. Said here only; see :func:`restart_keys`.
    """
    if isinstance(default, (list, dict)):
        raise TypeError("defaults must be immutable")
    return field(default=default, metadata=_restart({"check": check}, restart))


def _required(check) -> Any:
    return field(default=None, metadata={"check": check, "required": True})


def _section(cls, restart: str | None = None) -> Any:
    return field(default_factory=cls, metadata=_restart({"section": cls}, restart))


def _restart(metadata: dict, restart: str | None) -> dict:
    return {**metadata, "restart": restart} if restart else metadata


_LISTENERS = "waitress opens its listeners at start"


# -- the sections


@dataclass(frozen=True)
class Upstream:
    url: str = _required(_url)
    allow_insecure: bool = _setting(False, _bool)
    # CA files are prerequisites of a feature (see prerequisites()), checked after parsing.
    ca_file: str | None = _setting(None, _optional(_path))
    client_cert: str | None = _setting(None, _optional(_readable_file))
    client_key: str | None = _setting(None, _optional(_readable_file))
    connect_timeout: float = _setting(5.0, _seconds)
    read_timeout: float = _setting(60.0, _seconds)
    # Connect, send and an answer's head, in total (interim 1xx answers included); null:
    # read_timeout. Bounds what an origin dripping its head holds a worker thread.
    head_timeout: float | None = _setting(None, _optional(_seconds))
    # The longest pause between two reads of an answer's body; null: read_timeout.
    idle_timeout: float | None = _setting(None, _optional(_seconds))
    pool_size: int = _setting(32, _int(1, 4096))
    # /_proxy/ready answers 200 while the upstream was heard from within this window.
    ready_window: float = _setting(120.0, _seconds)

    def timeouts(self) -> tuple[float, float, float]:
        """Connect, head and idle timeout in seconds, for relay.Origin (nulls resolved)."""
        return self.connect_timeout, self.head_timeout or self.read_timeout, self.idle_timeout or self.read_timeout


@dataclass(frozen=True)
class Listen:
    host: str = _setting("127.0.0.1", _host)
    port: int = _setting(8002, _port)


@dataclass(frozen=True)
class Tls:
    cert_file: str = _setting("/etc/agent-proxy/tls/proxy.crt", _path)
    key_file: str = _setting("/etc/agent-proxy/tls/proxy.key", _path)


@dataclass(frozen=True)
class Networks:
    agents: tuple[IPNetwork, ...] = _setting(
        (ipaddress.ip_network("10.0.0.0/24"),), _list_of(_network)
    )
    upstream: tuple[IPNetwork, ...] = _setting((), _list_of(_network))


@dataclass(frozen=True)
class Agents:
    ports: tuple[int, ...] = _setting((2003,), _list_of(_port))
    tls: bool = _setting(True, _bool)
    verify: bool = _setting(False, _bool)
    ca_file: str | None = _setting(None, _optional(_path))


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = _setting(
        10 * 1024 * 1024, _int(0, 1 << 40), restart="waitress's own body cap (twice it, plus 1 MiB) is set at start"
    )
    threads: int = _setting(16, _int(1, 1024), restart="waitress makes its thread pool at start")
    # Signatures whose timestamp is further than this from the node's clock are refused;
    # a captured request can be replayed for up to twice this (README, Security). The
    # contract's default; a site whose clocks are synchronised may lower it.
    auth_skew_seconds: int = _setting(300, _int(1, 86400))
    # Requests one worker holds at once (queued in waitress or relaying); past it: 503.
    max_in_flight: int = _setting(64, _int(1, 100000))
    # After SIGTERM: how long in-flight requests may take before the worker exits anyway.
    drain_seconds: float = _setting(30.0, _seconds)
    # Each worker runs on one core of those it may use (worker N on the Nth, round-robin).
    pin_cpu: bool = _setting(True, _bool, restart="the core is chosen before the first thread starts")
    # Connections one worker holds open (waitress's connection_limit). Past it, the
    # longest-idle connection is closed to make room. At most 60,000, so that a worker's
    # descriptors (server.worker_descriptors) fit its unit's LimitNOFILE=65536.
    connection_limit: int = _setting(2000, _int(16, 60000), restart="waitress's connection limit and the descriptor limit are set at start")
    # Seconds a worker keeps a connection that has no request in progress.
    idle_timeout: int = _setting(60, _int(1, 86400), restart="waitress's idle sweep is set up at start")

    @property
    def front_per_worker(self) -> int:
        """Requests the node front sends one worker at once: an eighth under max_in_flight.

        A worker counts a request until its task ends, a moment after the front has read
        the whole answer and may already send the next one; at exactly max_in_flight
        that next request would find the worker full and get 503 ``overloaded`` (seen
        under load at 128 connections and more). The headroom absorbs the overlap.
        """
        return max(1, self.max_in_flight - max(1, self.max_in_flight // 8))


@dataclass(frozen=True)
class Front:
    """The node front (HAProxy or nginx on :2002) rendered from this config."""

    bind: str = _setting("0.0.0.0", _host)
    port: int = _setting(2002, _port)
    # Local workers on listen.port, listen.port+1, ...; 0 means one per CPU core.
    workers: int = _setting(0, _int(0, 64))
    # Balancers allowed to send the PROXY protocol header (nobody else may).
    balancers: tuple[IPNetwork, ...] = _setting((), _list_of(_network))
    # Concurrent connections one source address may hold on :2002; 0 disables the limit.
    max_conn_per_source: int = _setting(200, _int(0, 1000000))
    # Client connections the node front holds at once (HAProxy's maxconn); past it, new
    # ones wait in the kernel's accept queue. HAProxy reserves two descriptors a
    # connection: at most 90,000 under its unit's LimitNOFILE=200000. The default, at
    # ~30 KiB of HAProxy memory per TLS connection about 270 MiB, also starts where the
    # hard open-file limit is 20,000 (labs, test machines).
    max_connections: int = _setting(9000, _int(1, 90000))
    # With listen_control: the front's control-only port (networks.upstream and the
    # balancers), passed to the workers' control listeners.
    control_port: int = _setting(2004, _port)
    stats_socket: str = _setting("/run/haproxy/agent-proxy.sock", _path)
    # worker: every request goes to the workers; native: the front relays northbound calls
    # itself and hands /_proxy/ and southbound to the workers (haproxy/README.md).
    mode: str = _setting("worker", _choice("worker", "native"))


@dataclass(frozen=True)
class Logging:
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))
    format: str = _setting("json", _choice("json", "text"))
    # Access lines for /_proxy/health and /_proxy/ready: the fronts and balancers ask every
    # second or two, which on a quiet node is most of the log. The metrics count them anyway.
    access_health: bool = _setting(False, _bool)


@dataclass(frozen=True)
class Config:
    proxy_id: str = _required(_proxy_id)
    public_url: str | None = _setting(None, _optional(_url))
    upstream: Upstream = _section(Upstream)
    listen: Listen = _section(Listen, restart=_LISTENERS)
    # Optional separate listener for the upstream-facing paths (handshake, v2/features,
    # agents/..., metrics); when set, the agent-facing listener refuses them.
    listen_control: Listen | None = field(
        default=None, metadata=_restart({"section": Listen, "optional": True}, _LISTENERS)
    )
    tls: Tls = _section(Tls)
    shared_secret_file: str = _setting("/etc/agent-proxy/psk", _path)
    trusted_proxies: tuple[IPAddress, ...] = _setting(
        (ipaddress.ip_address("127.0.0.1"),), _list_of(_address)
    )
    networks: Networks = _section(Networks)
    agents: Agents = _section(Agents)
    limits: Limits = _section(Limits)
    front: Front = _section(Front)
    logging: Logging = _section(Logging)
    # Where it came from and which keys took their default (for the start-up log).
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})
    defaulted: frozenset[str] = field(default=frozenset(), compare=False, metadata={"internal": True})
    # Features whose prerequisites fail (feature -> reason), judged once, when parsed.
    failed_features: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, metadata={"internal": True}
    )

    @property
    def worker_count(self) -> int:
        return self.front.workers or (os.cpu_count() or 1)

    def worker_ports(self) -> list[int]:
        return [self.listen.port + i for i in range(self.worker_count)]

    def control_port_of(self, port: int) -> int | None:
        """The control listener of the worker on ``port``: worker N (listen.port + N) has
        it on listen_control.port + N; None without listen_control."""
        control = self.listen_control
        return control.port + (port - self.listen.port) if control else None

    def read_secret(self) -> bytes:
        """The shared secret's bytes (the file's text, surrounding white space removed)."""
        try:
            secret = Path(self.shared_secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [f"{self.source}: shared_secret_file: cannot read {self.shared_secret_file}: {_reason(exc)}"]
            ) from None
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError([
                f"{self.source}: shared_secret_file: {self.shared_secret_file} holds {len(secret)} characters; "
                f"at least {MIN_SECRET_LENGTH} are needed"
            ])
        return secret.encode("utf-8")

    def effective(self) -> dict[str, Any]:
        """Every setting as dotted key -> a JSON-able value, and ``defaults``: the keys left
        at their default; for the start-up log. Holds paths, never the secret itself."""
        settings = {key: _plain(value) for key, value in _flatten(self)}
        return {"settings": settings, "defaults": sorted(k for k in settings if k in self.defaulted)}

    def get(self, dotted: str) -> Any:
        """The value at a dotted key, e.g. ``limits.threads``."""
        value = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value


def restart_keys(cls: type = None, prefix: str = "") -> dict[str, str]:
    """Dotted key -> why a running worker applies it only at start (a reload cannot).

    Derived from the fields' ``restart`` metadata: the worker's reload log, the README's
    table and the Ansible role's restart decision all come from here.
    """
    found = {}
    for f in dataclasses.fields(cls or Config):
        key = prefix + f.name
        if f.metadata.get("restart"):
            found[key] = f.metadata["restart"]
        elif f.metadata.get("section"):
            found.update(restart_keys(f.metadata["section"], key + "."))
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -- parsing


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            items.extend(_flatten(value, key + "."))
        else:
            items.append((key, value))
    return items


def _build(cls, data: Any, prefix: str, problems: list[str], defaulted: set[str]):
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: must be a mapping, got {data!r}")
        return None
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown key{_did_you_mean(key, known, prefix)}")
    values = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        section = f.metadata.get("section")
        if name not in data:
            if section and not f.metadata.get("optional"):
                values[name] = _build(section, {}, key + ".", problems, defaulted)
            elif f.metadata.get("required"):
                problems.append(f"{key}: required")
            else:
                defaulted.add(key)
            continue
        raw = data[name]
        if section:
            if raw is None and f.metadata.get("optional"):
                continue
            values[name] = _build(section, raw, key + ".", problems, defaulted)
            continue
        try:
            values[name] = f.metadata["check"](raw)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        return None
    return cls(**values)


def _did_you_mean(key: Any, known, prefix: str) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _apply_environment(data: dict, environ: Mapping[str, str], problems: list[str]) -> dict[str, str]:
    """Merge the overrides into ``data``; return dotted key -> the variable that set it.

    A section the file does not have, made for a variable, maps to that variable too, so
    that a typo in a section name blames the variable and not the file.
    """
    origins: dict[str, str] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        try:
            value = _deep_copy(load_yaml(text), name) if text != "" else None
        except yaml.YAMLError:
            problems.append(f"{name}: cannot parse {shown(text)}")
            continue
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = data
        for depth, part in enumerate(path[:-1]):
            if part not in node:
                origins.setdefault(".".join(path[:depth + 1]), name)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{name}: {'.'.join(path)} is not inside a section")
                break
            node = child
        else:
            node[path[-1]] = value
            origins[".".join(path)] = name
    return origins


def _blame(problem: str, source: str, origins: dict[str, str]) -> str:
    """Prefix a "key: what is wrong" line with where the key came from."""
    key = problem.split(":", 1)[0]
    if problem.startswith(ENV_PREFIX):
        return problem
    return f"{origins.get(key, source)}: {problem}"


def _semantic_checks(config: Config, problems: list[str]) -> None:
    up = urlsplit(config.upstream.url)
    if up.scheme == "http" and not config.upstream.allow_insecure:
        problems.append(
            "upstream.url: plain http upstream needs upstream.allow_insecure: true"
        )
    if (config.upstream.client_cert is None) != (config.upstream.client_key is None):
        problems.append("upstream.client_cert: client_cert and client_key go together")
    if not config.networks.agents:
        problems.append("networks.agents: at least one agent network is required")
    _check_client_files(config, problems)
    control = config.listen_control
    if control and (control.host, control.port) == (config.listen.host, config.listen.port):
        problems.append("listen_control: must differ from listen")
    # The node front sends a worker up to max_in_flight requests and keeps as many idle
    # connections (pool-max-conn); during a reload the old HAProxy holds as many again.
    front_share = 4 * config.limits.max_in_flight + 16
    if config.limits.connection_limit < front_share:
        problems.append(
            f"limits.connection_limit: must be at least 4 x limits.max_in_flight + 16 ({front_share}), "
            "the connections the node front may hold to one worker"
        )
    if control and config.front.control_port == config.front.port:
        problems.append("front.control_port: must differ from front.port")


def prerequisites(config: Config) -> list[tuple[str, str]]:
    """(feature, "key: problem") for each prerequisite of a feature that fails.

    ``parse`` runs this once and keeps the result as ``Config.failed_features``. A command
    that needs the feature (check-config, register) reports these as errors; a worker
    (``load(..., lenient=True)``) starts anyway and reports the feature as failed.
    Readable is not enough: a CA file must load as CA certificates.
    """
    failed = []
    for feature, key, cafile in (("northbound", "upstream.ca_file", config.upstream.ca_file),
                                 ("southbound", "agents.ca_file", config.agents.ca_file)):
        if not cafile:
            continue
        if not os.access(cafile, os.R_OK) or not os.path.isfile(cafile):
            failed.append((feature, f"{key}: cannot read file {cafile}"))
            continue
        try:
            ssl.create_default_context(cafile=cafile)
        except (ssl.SSLError, ValueError) as exc:
            failed.append((feature, f"{key}: cannot load {cafile} as CA certificates: {getattr(exc, 'reason', None) or exc}"))
    if not config.agents.ports:
        failed.append(("southbound", "agents.ports: at least one agent port is required"))
    return failed


def tls_file_problems(config: Config) -> list[str]:
    """The front's certificate and key, for check-config: each must be a file that opens.

    Not part of ``parse``: `init` writes them with the config, and nothing but the front
    (root) reads them. So a file this user may not open (the key, 0600 root, when a
    worker's reload runs check-config as agent-proxy) passes: it is root's to read."""
    problems = []
    for key, path in (("tls.cert_file", config.tls.cert_file), ("tls.key_file", config.tls.key_file)):
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            continue
        except FileNotFoundError:
            problems.append(f"{key}: cannot read file {path}: no such file")
        except OSError as exc:
            problems.append(f"{key}: cannot read file {path}: {exc.strerror}")
    return problems


def _check_client_files(config: Config, problems: list[str]) -> None:
    """Readable is not enough: the client certificate and key must load together."""
    up = config.upstream
    if up.client_cert and up.client_key:
        try:
            ssl.create_default_context().load_cert_chain(up.client_cert, up.client_key)
        except (ssl.SSLError, ValueError) as exc:
            problems.append(
                f"upstream.client_cert: cannot load {up.client_cert} with key {up.client_key}: "
                f"{getattr(exc, 'reason', None) or exc}"
            )


def warnings(config: Config) -> list[str]:
    """Settings that are allowed but that an operator should hear about."""
    found = []
    if config.public_url and config.public_url.startswith("http:"):
        found.append("public_url: plain http; the upstream will reach this proxy without TLS")
    if config.upstream.url.startswith("http:"):
        found.append("upstream.url: plain http; allowed by upstream.allow_insecure")
    if not config.networks.upstream:
        found.append("networks.upstream: empty; control endpoints accept any source (still signed)")
    up = urlsplit(config.upstream.url)
    if config.front.mode == "native" and up.scheme == "https" and is_address(up.hostname) and not config.upstream.ca_file:
        found.append(
            "front.mode: native with an IP address in upstream.url and no upstream.ca_file: the front checks that "
            "a system CA signed the upstream's certificate, not the address in it (HAProxy 2.6 checks names only)"
        )
    return found


def parse(data: Any, source: str = "<config>", environ: Mapping[str, str] | None = None, lenient: bool = False) -> Config:
    """Build a Config from already-loaded YAML data; raise ConfigError naming every problem.

    ``lenient``: a failing feature prerequisite (see prerequisites()) is not a problem; the
    worker reports that feature as failed instead.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the file must hold a mapping of keys, got {type(data).__name__}"])
    data = _deep_copy(data, source)
    origins = _apply_environment(data, environ if environ is not None else os.environ, problems)
    defaulted: set[str] = set()
    config = _build(Config, data, "", problems, defaulted)
    failed: dict[str, str] = {}
    if config is not None and not problems:
        _semantic_checks(config, problems)
        for feature, problem in prerequisites(config):
            failed[feature] = f"{failed[feature]}; {problem}" if feature in failed else problem
            if not lenient:
                problems.append(problem)
    if problems:
        raise ConfigError([_blame(p, source, origins) for p in problems])
    return dataclasses.replace(
        config, source=source, defaulted=frozenset(defaulted), failed_features=MappingProxyType(failed)
    )


def load(path: str | os.PathLike, environ: Mapping[str, str] | None = None, lenient: bool = False) -> Config:
    """Read and parse a configuration file."""
    source = str(path)
    if not source:
        raise ConfigError(["the configuration file's path is empty"])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {_reason(exc)}"]) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: {yaml_problem(exc)}"]) from None
    return parse(data, source, environ, lenient)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one silently). Keys a merge (``<<: *base``) brings in may be
    given again: that is what merging is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text to data, as every file of ours is read: safe types only, no key twice.
    Raises yaml.YAMLError; a document nested too deep to parse is one too."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: PyYAML's own message spans several, with a caret."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"not valid YAML{where}: {problem}"


MAX_DEPTH, MAX_VALUES = 16, 100_000   # a config is a few levels deep and some hundred values


def _deep_copy(data: Any, source: str) -> Any:
    """A copy that shares nothing, so that overrides change one place. Bounded: YAML
    aliases can make a few lines stand for billions of values, or for a value that holds
    itself."""
    left = [MAX_VALUES]

    def copy(value: Any, depth: int) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise ConfigError([f"{source}: holds more than {MAX_VALUES} values (YAML aliases repeating each other?)"])
        if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
            raise ConfigError([f"{source}: nested deeper than {MAX_DEPTH} levels (or a YAML alias holds itself)"])
        if isinstance(value, dict):
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v, depth + 1) for v in value]
        return value

    return copy(data, 0)
