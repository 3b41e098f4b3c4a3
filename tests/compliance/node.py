"""What the controls know about one audited host, all of it read through testinfra.

Nothing here touches the machine pytest runs on: the config, files, processes, sockets and
firewall are read on the host under audit (local, SSH or Ansible), so the same suite audits
a lab node in a network namespace and a booted VM. Expected values come from the node's
own configuration, never from the tests.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shlex
from dataclasses import dataclass

import yaml

from agent_proxy import config as configuration

# Keys whose check reads a local file: the file lives on the audited host, not here.
_HOST_FILE_KEYS = (("upstream", "ca_file"), ("upstream", "client_cert"), ("upstream", "client_key"), ("agents", "ca_file"))


FRONT_UNITS = ("agent-proxy-front.service", "haproxy.service")
FIREWALL_UNIT, FIREWALL_RULES = "agent-proxy-firewall.service", "/etc/agent-proxy/firewall/rules.v4"


@dataclass(frozen=True)
class Proc:
    pid: int
    user: str
    comm: str
    args: str


class Node:
    """One audited host: its configuration and how its services are run."""

    def __init__(self, host, config_path: str, front_config: str | None, install_dir: str,
                 probe_timeout: float = 10.0):
        self.host = host
        self.config_path = config_path
        self.front_config_option = front_config
        self.install_dir = install_dir
        # The bound of one TLS or HTTP probe run on the host (--ap-probe-timeout).
        self.probe_timeout = probe_timeout

    # -- the configuration, read on the host

    @functools.cached_property
    def raw(self) -> dict:
        f = self.host.file(self.config_path)
        if not f.exists:
            raise AssertionError(f"{self.config_path} does not exist on the host (set --ap-config)")
        data = yaml.safe_load(f.content_string)
        if not isinstance(data, dict):
            raise AssertionError(f"{self.config_path}: not a mapping of keys")
        return data

    @functools.cached_property
    def config(self) -> configuration.Config:
        """The typed config; file-path keys are kept as given (they are checked on the host)."""
        data = yaml.safe_load(yaml.safe_dump(self.raw))
        for section, key in _HOST_FILE_KEYS:
            if isinstance(data.get(section), dict):
                data[section].pop(key, None)
        try:
            return configuration.parse(data, f"{self.config_path}", environ={})
        except configuration.ConfigError as exc:
            raise AssertionError(f"the node's config does not parse: {exc}") from None

    @functools.cached_property
    def cores(self) -> int:
        return int(self.host.check_output("nproc"))

    @functools.cached_property
    def worker_ports(self) -> list[int]:
        """listen.port .. listen.port + front.workers - 1; front.workers 0 = the host's cores."""
        count = self.config.front.workers or self.cores
        return [self.config.listen.port + i for i in range(count)]

    def read_secret(self) -> bytes:
        text = self.host.file(self.config.shared_secret_file).content_string.strip()
        return text.encode()

    @property
    def front_address(self) -> str:
        """Where a client on the host reaches the front: front.bind, or loopback for a wildcard."""
        bind = self.config.front.bind
        if bind in ("0.0.0.0", "*"):
            return "127.0.0.1"
        if bind == "::":
            return "::1"
        return bind

    @property
    def front_target(self) -> str:
        """front_address:port, the address bracketed if it is IPv6."""
        address = self.front_address
        return f"[{address}]:{self.config.front.port}" if ":" in address else f"{address}:{self.config.front.port}"

    def front_url(self, path: str) -> str:
        return f"https://{self.front_target}{path}"

    # -- how services run: systemd units, or plain processes in a network namespace

    @functools.cached_property
    def service_mode(self) -> tuple[str, str]:
        """(mode, why): "systemd", or "processes"/"namespace" when services are checked as
        plain processes (no systemd as PID 1, or a network-namespace lab node).

        systemd only when it is PID 1 and the audit runs in PID 1's network namespace; a
        lab node is a network namespace on a shared machine, where units do not describe
        the node's processes.
        """
        out = self.host.run(
            "test -d /run/systemd/system && echo systemd; echo \"named $(ip netns identify 2>/dev/null)\"; "
            "echo \"pid1 $(readlink /proc/1/ns/net)\"; echo \"self $(readlink /proc/self/ns/net)\""
        ).stdout
        lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
        pid1, own, named = lines.get("pid1", ""), lines.get("self", ""), lines.get("named", "").strip()
        if named:
            return "namespace", f"a lab node: network namespace {named}"
        if pid1 and own and pid1 != own:
            return "namespace", f"a lab node: network namespace {own} is not PID 1's"
        if "systemd" not in lines:
            return "processes", "systemd is not PID 1"
        return "systemd", "systemd is PID 1"

    @property
    def systemd(self) -> bool:
        return self.service_mode[0] == "systemd"

    @property
    def namespace_node(self) -> bool:
        return self.service_mode[0] == "namespace"

    def process(self, pid: int) -> Proc | None:
        """A process by PID, read from /proc (no procps needed on the host)."""
        pid = int(pid)
        result = self.host.run(
            f"cat /proc/{pid}/comm && grep '^Uid:' /proc/{pid}/status && tr '\\0' ' ' < /proc/{pid}/cmdline"
        )
        lines = result.stdout.splitlines()
        if result.rc != 0 or len(lines) < 2:
            return None
        uid = lines[1].split()[2]  # Uid: real effective saved fs
        entry = self.host.run(f"getent passwd {uid}").stdout
        user = entry.split(":", 1)[0] if entry else uid
        return Proc(pid, user, lines[0].strip(), " ".join(lines[2:]).strip())

    def listeners(self, port: int) -> list[tuple[str, list[int]]]:
        """(address, [pids]) of TCP sockets listening on ``port`` in the host's network namespace."""
        out = self.host.check_output(f"ss -Hltnp 'sport = :{int(port)}'")
        found = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            local = fields[3]
            address = local.rsplit(":", 1)[0].strip("[]")
            address = address.split("%", 1)[0]
            found.append((address, [int(p) for p in re.findall(r"pid=(\d+)", line)]))
        return found

    def listening_processes(self, port: int) -> list[Proc]:
        procs = []
        for _, pids in self.listeners(port):
            for pid in pids:
                proc = self.process(pid)
                if proc and proc not in procs:
                    procs.append(proc)
        return procs

    def unit_main_process(self, unit: str) -> Proc | None:
        pid = self.host.check_output(f"systemctl show -p MainPID --value {shlex.quote(unit)}").strip()
        return self.process(int(pid)) if pid.isdigit() and pid != "0" else None

    def worker(self, port: int) -> Proc | None:
        """The worker serving ``port``: the unit's main process, or the process listening."""
        if self.systemd:
            return self.unit_main_process(f"agent-proxy@{port}.service")
        procs = [p for p in self.listening_processes(port) if "agent-proxy" in f"{p.comm} {p.args}"]
        return procs[0] if procs else None

    @functools.cached_property
    def service_users(self) -> set[str]:
        """Users the running workers run as."""
        return {proc.user for proc in map(self.worker, self.worker_ports) if proc is not None}

    @functools.cached_property
    def front_unit(self) -> str:
        """The appliance's own front unit where it is installed, else Debian's haproxy.service."""
        for unit in FRONT_UNITS:
            if self.host.run(f"systemctl cat {unit}").rc == 0:
                return unit
        return FRONT_UNITS[-1]

    @functools.cached_property
    def front_processes(self) -> list[Proc]:
        return [p for p in self.listening_processes(self.config.front.port) if p.comm == "haproxy"]

    @functools.cached_property
    def front_config_files(self) -> list[str]:
        """--ap-front-config, else the -f files of the running HAProxy, else the default path."""
        if self.front_config_option:
            return [self.front_config_option]
        for proc in self.front_processes:
            files = re.findall(r"(?:^|\s)-f\s+(\S+)", proc.args)
            if files:
                return files
        default = "/etc/agent-proxy/haproxy.cfg" if self.front_unit == FRONT_UNITS[0] else "/etc/haproxy/haproxy.cfg"
        return [default]

    # -- the firewall

    def filter_table(self, family: int) -> "FilterTable":
        command = "iptables-save" if family == 4 else "ip6tables-save"
        path = self.host.find_command(command)
        return FilterTable.parse(self.host.check_output(f"{path} -t filter"))

    @functools.cached_property
    def front_sources(self) -> set[ipaddress.IPv4Network]:
        """IPv4 sources the config allows on the front port (agents, balancers, and the
        upstream unless listen_control gives it a port of its own)."""
        networks = self.config.networks.agents + self.config.front.balancers
        if self.config.listen_control is None:
            networks += self.config.networks.upstream
        return {n for n in networks if n.version == 4}

    @functools.cached_property
    def control_sources(self) -> set[ipaddress.IPv4Network]:
        """IPv4 sources the config allows on front.control_port: none without listen_control."""
        if self.config.listen_control is None:
            return set()
        return {n for n in self.config.networks.upstream + self.config.front.balancers if n.version == 4}


@dataclass
class FilterTable:
    """The filter table as iptables-save prints it: chain policies and rules (as argv)."""

    policies: dict[str, str]
    rules: dict[str, list[list[str]]]

    @classmethod
    def parse(cls, text: str) -> "FilterTable":
        policies: dict[str, str] = {}
        rules: dict[str, list[list[str]]] = {}
        for line in text.splitlines():
            if line.startswith(":"):
                name, policy = line[1:].split()[:2]
                policies[name] = policy
                rules.setdefault(name, [])
            elif line.startswith("-A "):
                argv = shlex.split(line)
                rules.setdefault(argv[1], []).append(argv[2:])
        return cls(policies, rules)

    def policy(self, chain: str = "INPUT") -> str:
        # No filter table loaded at all means nothing filters: ACCEPT.
        return self.policies.get(chain, "ACCEPT")

    def sources_admitted(self, port: int, chain: str = "INPUT", seen: frozenset = frozenset()) -> list[str]:
        """Sources from which a NEW TCP connection to ``port`` from off the host is accepted.

        "anywhere" stands for a rule (or the chain's fall-through) without a source.
        Conservative: a rule that might match is counted as matching.
        """
        found: list[str] = []
        for rule in self.rules.get(chain, []):
            options = _options(rule)
            target = options.get("-j", [""])[0]
            if not _may_admit(options, port):
                continue
            source = "anywhere" if "-s" not in options or "!-s" in options else options["-s"][0]
            if target == "ACCEPT":
                found.append(source)
            elif target in self.rules and target not in seen:
                inner = self.sources_admitted(port, target, seen | {chain})
                found.extend(source if s == "anywhere" else s for s in inner)
            elif target in ("DROP", "REJECT") and set(options) <= {"-j"}:
                return found  # an unconditional drop: nothing falls through
        if chain == "INPUT" and self.policy(chain) == "ACCEPT":
            found.append("anywhere")
        return found


def _options(rule: list[str]) -> dict[str, list[str]]:
    """-s 10.0.0.0/24 -p tcp -m tcp --dport 2002 -j ACCEPT -> {"-s": [...], "-p": ["tcp"], ...}."""
    options: dict[str, list[str]] = {}
    negate = False
    key = None
    for token in rule:
        if token == "!":
            negate = True
            continue
        if token.startswith("-"):
            key = token
            options.setdefault(key, [])
            if negate:
                options["!" + key] = []
                negate = False
        elif key:
            options[key].append(token)
    return options


def _ports(spec: str) -> set[int] | None:
    ports: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition(":")
        ports.update(range(int(low or 0), int(high or low or 65535) + 1))
    return ports


def _may_admit(options: dict[str, list[str]], port: int) -> bool:
    """Could this rule match a NEW TCP connection to ``port`` arriving on a real interface?"""
    if options.get("-i") == ["lo"] and "!-i" not in options:
        return False
    states = options.get("--ctstate") or options.get("--state")
    if states and "!--ctstate" not in options and "!--state" not in options and "NEW" not in states[0].split(","):
        return False
    protocol = options.get("-p")
    if protocol and "!-p" not in options and protocol[0] not in ("tcp", "6", "all"):
        return False
    for key in ("--dport", "--dports", "--destination-port"):
        if key in options and "!" + key not in options and port not in _ports(options[key][0]):
            return False
    return True
