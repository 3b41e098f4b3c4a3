"""The appliance's boot seed, applied on first boot (appliance/firstboot/agent-proxy-firstboot).

``seed.env`` holds ``KEY=value`` lines, read as data and never executed; lists are
separated by spaces or commas. ``appliance/seed.env.example`` documents every key, and
KEYS below are the ones this module accepts: an unknown key or a bad value stops first
boot with one line naming it (a key silently ignored would make a node that does not
serve); the config keys are checked by the config's own parser, as the workers read them
(a network with host bits set, for one, is refused). Besides seed.env the seed may carry files, installed by first boot:
``upstream-ca.pem`` (the upstream's CA; sets upstream.ca_file unless UPSTREAM_CA_FILE
does) and the shared identity ``psk``, ``proxy.crt``, ``proxy.key`` (see
agent-proxy-firstboot).

    python -m agent_proxy.seed --seed-dir DIR --config FILE --firewall-vars FILE [--root /]

edits the config and the firewall variables in place and writes the node's hostname,
static network, resolver and NTP files under ``--root``; it prints what it set. First boot
reads the seed and the configuration only through here, so one parser reads each:

    python -m agent_proxy.seed --seed-dir DIR --get KEY...       the seed's checked values
    python -m agent_proxy.seed --config FILE --get-config KEY... e.g. tls.cert_file
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from . import config as configuration, files
from .hostport import is_host_name

# Keys that set a config key, and the config key.
CONFIG_KEYS = {
    "PROXY_ID": "proxy_id",
    "PUBLIC_URL": "public_url",
    "UPSTREAM_URL": "upstream.url",
    "UPSTREAM_ALLOW_INSECURE": "upstream.allow_insecure",
    "UPSTREAM_CA_FILE": "upstream.ca_file",
    "AGENT_NETWORKS": "networks.agents",
    "UPSTREAM_NETWORKS": "networks.upstream",
    "BALANCERS": "front.balancers",
    "FRONT_MODE": "front.mode",
}
# Keys for the node around the proxy (appliance/seed.env.example says what each sets).
NODE_KEYS = ("ADMIN_NETWORKS", "HOSTNAMES", "HOSTNAME", "ADDRESS", "GATEWAY", "DNS", "NTP_SERVERS")
KEYS = (*CONFIG_KEYS, *NODE_KEYS)
CA_SEED_FILE = "upstream-ca.pem"
CA_INSTALLED = "/etc/agent-proxy/tls/upstream-ca.pem"
HEADER = (
    "# agent-proxy configuration of this appliance (first boot wrote it from the image's\n"
    "# defaults and the boot seed). Nothing on the appliance overwrites it: edit it with\n"
    "# `sudoedit`, then `sudo agent-proxy apply` checks it and puts it into service.\n"
)


class SeedError(Exception):
    """Problems with the seed, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_env(text: str, source: str) -> dict[str, str]:
    """KEY=value lines (later ones win); blank lines and # comments are skipped."""
    values: dict[str, str] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            problems.append(f"{source} line {number}: expected KEY=value")
        elif key not in KEYS:
            problems.append(f"{source} line {number}: unknown key {key} (known: {', '.join(KEYS)})")
        else:
            values[key] = value.strip().strip('"').strip("'")
    if problems:
        raise SeedError(problems)
    return values


def read_env(path: Path) -> dict[str, str]:
    """The seed file's values, {} when there is none. A byte-order mark, which some
    editors write, is allowed; bytes that are not UTF-8 are a SeedError naming the file."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SeedError([f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"]) from None
    return parse_env(text, str(path))


def _items(value: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", value) if item]


def _network(item: str) -> str:
    return str(ipaddress.ip_network(item))  # strict, as the config: 10.0.0.1/24 is refused


def _interface(item: str) -> str:
    if "/" not in item:
        raise ValueError(f"{item!r} needs a prefix length, e.g. {item}/24")
    return str(ipaddress.ip_interface(item))


def _address(item: str) -> str:
    return str(ipaddress.ip_address(item))


def _host(item: str) -> str:
    try:
        return _address(item)
    except ValueError:
        if is_host_name(item):
            return item
        raise ValueError(f"{item!r} is neither an IP address nor a host name") from None


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


# The list keys and the check of each item; the config keys' items are checked by the
# config's own parser (check_config), as the workers will read them.
LIST_CHECKS: dict[str, Callable[[str], str] | None] = {
    "AGENT_NETWORKS": None, "UPSTREAM_NETWORKS": None, "BALANCERS": None,
    "ADMIN_NETWORKS": _network, "HOSTNAMES": _host, "ADDRESS": _interface, "GATEWAY": _address,
    "DNS": _address, "NTP_SERVERS": _host,
}


def validate(values: dict[str, str], source: str) -> dict[str, Any]:
    """Typed settings from the raw values; every problem reported at once."""
    settings: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        if not value:
            continue  # an empty value leaves the image's default
        try:
            if key in LIST_CHECKS:
                check = LIST_CHECKS[key] or str
                settings[key] = [check(item) for item in _items(value)]
            elif key == "UPSTREAM_ALLOW_INSECURE":
                settings[key] = _bool(value)
            elif key == "HOSTNAME":
                if not is_host_name(value):
                    raise ValueError(f"{value!r} is not a host name")
                settings[key] = value
            else:
                settings[key] = value
        except ValueError as exc:
            problems.append(f"{source}: {key}: {exc}")
    if problems:
        raise SeedError(problems)
    return settings


def seeded_config(path: Path, settings: dict[str, Any]) -> tuple[dict, list[str]]:
    """The YAML file's data with the seed's config keys set (as data), and the keys set."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    changed = []
    for key, dotted in CONFIG_KEYS.items():
        if key not in settings:
            continue
        section, _, name = dotted.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[name] = settings[key]
        changed.append(dotted)
    return data, changed


def check_config(data: dict, config_source: str, seed_source: str) -> None:
    """The seeded configuration through the config's own parser; a problem with a key the
    seed set names the seed's key. Lenient: the CA files are checked where they are used
    (first boot's `agent-proxy apply`), after they are installed."""
    try:
        configuration.parse(data, config_source, environ={}, lenient=True)
    except configuration.ConfigError as exc:
        by_config_key = {dotted: key for key, dotted in CONFIG_KEYS.items()}
        problems = []
        for problem in exc.problems:
            dotted, _, reason = problem.removeprefix(f"{config_source}: ").partition(": ")
            problems.append(f"{seed_source}: {by_config_key[dotted]}: {reason}" if dotted in by_config_key else problem)
        raise SeedError(problems) from None


def apply_firewall_vars(path: Path, admin_networks: list[str]) -> None:
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}
    data["admin_networks"] = admin_networks
    files.replace(path, yaml.safe_dump(data, sort_keys=False), *files.keep_owner_and_mode(path, 0o640))


def system_files(settings: dict[str, Any], root: Path) -> dict[Path, str]:
    """The host name, static network, resolver and NTP files the seed asks for."""
    files: dict[Path, str] = {}
    if "HOSTNAME" in settings:
        name = settings["HOSTNAME"]
        short = name.split(".")[0]
        files[root / "etc/hostname"] = short + "\n"
        hosts = (root / "etc/hosts").read_text(encoding="utf-8") if (root / "etc/hosts").exists() else ""
        kept = [line for line in hosts.splitlines() if not line.startswith("127.0.1.1")]
        files[root / "etc/hosts"] = "\n".join(kept + [f"127.0.1.1 {name} {short}" if name != short else f"127.0.1.1 {name}"]) + "\n"
    if "ADDRESS" in settings:
        lines = ["# Written by first boot from the boot seed (ADDRESS, GATEWAY, DNS).", "[Match]", "Name=eth0", "",
                 "[Network]", "DHCP=no"]
        lines += [f"Address={a}" for a in settings["ADDRESS"]]
        lines += [f"Gateway={g}" for g in settings.get("GATEWAY", [])]
        files[root / "etc/systemd/network/10-eth0.network"] = "\n".join(lines) + "\n"
    if "DNS" in settings:
        files[root / "etc/resolv.conf"] = "".join(f"nameserver {d}\n" for d in settings["DNS"])
    if "NTP_SERVERS" in settings:
        files[root / "etc/chrony/sources.d/agent-proxy.sources"] = "".join(
            f"server {server} iburst\n" for server in settings["NTP_SERVERS"])
        conf = root / "etc/chrony/chrony.conf"
        if conf.exists():
            # The seed's servers replace the public pool (the site may not reach it).
            files[conf] = "".join(
                f"# {line}  (replaced by the boot seed's NTP_SERVERS)\n" if line.startswith(("pool ", "server ")) else line + "\n"
                for line in conf.read_text(encoding="utf-8").splitlines())
    return files


def apply(seed_dir: Path, config: Path, firewall_vars: Path, root: Path) -> list[str]:
    """Apply the seed in ``seed_dir``; returns what was done, one line each."""
    env = seed_dir / "seed.env"
    values = read_env(env)
    settings = validate(values, str(env))
    done = []
    ca = seed_dir / CA_SEED_FILE
    if ca.exists():
        settings.setdefault("UPSTREAM_CA_FILE", CA_INSTALLED)
    data, changed = seeded_config(config, settings)
    check_config(data, str(config), str(env))
    if ca.exists():
        target = root / CA_INSTALLED.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        files.replace(target, ca.read_bytes(), 0o644)
        done.append(f"installed the seed's {CA_SEED_FILE} as {CA_INSTALLED}")
    files.replace(config, HEADER + yaml.safe_dump(data, sort_keys=False), *files.keep_owner_and_mode(config, 0o640))
    done.append(f"{config}: set {', '.join(changed) or 'nothing'} from the boot seed")
    if "ADMIN_NETWORKS" in settings:
        apply_firewall_vars(firewall_vars, settings["ADMIN_NETWORKS"])
        done.append(f"{firewall_vars}: admin_networks {' '.join(settings['ADMIN_NETWORKS'])}")
    for path, text in system_files(settings, root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        files.replace(path, text, *files.keep_owner_and_mode(path, 0o644))
        done.append(f"wrote {path}")
    return done


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return "" if value is None else str(value)


def seed_values(seed_dir: Path, keys: list[str]) -> list[str]:
    """The seed's checked value of each key, as first boot uses it ("" when unset)."""
    unknown = [key for key in keys if key not in KEYS]
    if unknown:
        raise SeedError([f"--get: unknown key {key} (known: {', '.join(KEYS)})" for key in unknown])
    env = seed_dir / "seed.env"
    values = read_env(env)
    settings = validate(values, str(env))
    return [_shown(settings.get(key)) for key in keys]


def config_values(config: Path, keys: list[str]) -> list[str]:
    """Each dotted key of the configuration as the workers read it (defaults filled in)."""
    loaded = configuration.load(config, lenient=True)
    shown = []
    for key in keys:
        value: Any = loaded
        for name in key.split("."):
            if not dataclasses.is_dataclass(value) or name not in {f.name for f in dataclasses.fields(value)}:
                raise SeedError([f"--get-config: {key} is not a configuration key"])
            value = getattr(value, name)
        shown.append(_shown(value))
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_proxy.seed", description=__doc__.splitlines()[0])
    parser.add_argument("--seed-dir", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--firewall-vars", type=Path)
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--get", nargs="+", metavar="KEY",
                        help="print the seed's checked value of each KEY, one line each (a list space-separated, "
                             "empty when unset); with --seed-dir; changes nothing")
    parser.add_argument("--get-config", nargs="+", metavar="KEY",
                        help="print each dotted configuration KEY (defaults filled in), one line each; "
                             "with --config; changes nothing")
    args = parser.parse_args(argv)
    needed = ["seed_dir"] if args.get else ["config"] if args.get_config else ["seed_dir", "config", "firewall_vars"]
    missing = [f"--{name.replace('_', '-')}" for name in needed if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        if args.get:
            lines = seed_values(args.seed_dir, args.get)
        elif args.get_config:
            lines = config_values(args.config, args.get_config)
        else:
            lines = apply(args.seed_dir, args.config, args.firewall_vars, args.root)
        for line in lines:
            print(line)
    except (SeedError, configuration.ConfigError) as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"seed: {configuration.yaml_problem(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{getattr(exc, 'filename', None) or 'seed'}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
