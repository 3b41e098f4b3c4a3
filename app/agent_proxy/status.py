"""`agent-proxy status`: what this node is and whether it serves, on one screen.

The same text is the console banner (/etc/issue, written by agent-proxy-issue.service)
and the login message (/etc/update-motd.d/50-agent-proxy). Every field is read from
the node itself: the config, the certificate, systemd, the workers' /_proxy/ready, and
the two result files below. Exit status 0 when the front and every worker are active and
no unit failed, else 1.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from . import config as configuration
from .config import ConfigError
from .hostport import hostport

STATE_DIR = Path("/var/lib/agent-proxy")
# One line each, written by first boot and by `agent-proxy register`/`deregister`.
FIRSTBOOT_RESULT = STATE_DIR / "firstboot.result"
REGISTRATION_RESULT = STATE_DIR / "registration.result"
FRONT_UNIT = "agent-proxy-front.service"


def record_registration(line: str) -> None:
    """Keep the last registration result for `status` (only where the state folder exists)."""
    if not STATE_DIR.is_dir():
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        REGISTRATION_RESULT.write_text(f"{stamp}: {line}\n", encoding="utf-8")
    except OSError as exc:
        print(f"agent-proxy: warning: cannot record the result in {REGISTRATION_RESULT}: {exc.strerror}", file=sys.stderr)


def _systemctl(*args: str) -> str:
    try:
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip()


def unit_state(unit: str) -> str:
    return _systemctl("is-active", unit) or "unknown"


def failed_units() -> list[str]:
    out = _systemctl("list-units", "--failed", "--plain", "--no-legend", "--no-pager")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def readiness(host: str, port: int) -> str:
    """The worker's own word on the upstream: its /_proxy/ready."""
    try:
        with urllib.request.urlopen(f"http://{hostport(host, port)}/_proxy/ready", timeout=3) as answer:
            return "ready" if answer.status == 200 else f"not ready ({answer.status})"
    except urllib.error.HTTPError as exc:
        return f"not ready ({exc.code})"
    except (OSError, ValueError):
        return "no answer"


def addresses() -> str:
    try:
        out = subprocess.run(["ip", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = [f"{fields[3]} ({fields[1]})" for fields in (line.split() for line in out.splitlines()) if len(fields) > 3]
    return ", ".join(found) or "none"


def certificate(path: str) -> str:
    from .tlsutil import MaterialError, fingerprint, load_cert

    try:
        pem = Path(path).read_bytes()
        expires = load_cert(pem).not_valid_after_utc
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror})"
    except MaterialError:
        return f"{path}: not a PEM certificate"
    days = (expires - datetime.datetime.now(datetime.timezone.utc)).days
    when = f"expires {expires:%Y-%m-%d}" + (f" (in {days} days)" if days >= 0 else " (EXPIRED)")
    return f"SHA-256 {fingerprint(pem)}, {when}"


def _result(path: Path, missing: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or missing
    except FileNotFoundError:
        return missing
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror})"


def collect(config_path: str) -> tuple[list[tuple[str, str]], bool]:
    """(label, value) rows and whether the node serves."""
    rows: list[tuple[str, str]] = []
    serving = True
    try:
        # As the worker loads it: a feature whose prerequisite fails is a failed feature on
        # a serving node, not an invalid file.
        config = configuration.load(config_path, lenient=True)
        problems: list[str] = []
    except ConfigError as exc:
        config, problems = None, exc.problems
    rows.append(("host", socket.gethostname()))
    rows.append(("addresses", addresses()))
    if config is None:
        rows.append(("config", "INVALID: " + "; ".join(problems)))
        serving = False
    else:
        rows.append(("proxy id", config.proxy_id))
        states = {port: readiness(config.listen.host, port) for port in config.worker_ports()}
        ready = sum(state == "ready" for state in states.values())
        rows.append(("upstream", f"{config.upstream.url} ({ready}/{len(states)} workers ready)"))
        rows.append(("public url", config.public_url or "not set"))
        rows.append(("certificate", certificate(config.tls.cert_file)))
        failed_features = config.failed_features
        serving &= not failed_features
        rows.append(("features", "; ".join(f"{name} FAILED: {reason}" for name, reason in failed_features.items())
                     or "all configured features running"))
        for port, ready_state in states.items():
            unit = f"agent-proxy@{port}.service"
            state = unit_state(unit)
            serving &= state == "active"
            rows.append((f"worker {port}", f"{state}, {ready_state}"))
    front = unit_state(FRONT_UNIT)
    serving &= front == "active"
    rows.append(("front", f"{front} ({FRONT_UNIT})"))
    failed = failed_units()
    serving &= not failed
    rows.append(("failed units", ", ".join(failed) or "none"))
    rows.append(("first boot", _result(FIRSTBOOT_RESULT, "no result recorded")))
    rows.append(("registration", _result(REGISTRATION_RESULT, "never run (sudo agent-proxy register)") if STATE_DIR.is_dir()
                 else f"not recorded on this host (no {STATE_DIR}; the image and the role make it)"))
    return rows, serving


def text(rows: list[tuple[str, str]], serving: bool) -> str:
    width = max(len(label) for label, _ in rows)
    head = "agent-proxy: serving" if serving else "agent-proxy: NOT SERVING (see the rows below)"
    return "\n".join([head, *(f"  {label.ljust(width)}  {value}" for label, value in rows)]) + "\n"


def as_json(rows: list[tuple[str, str]], serving: bool) -> str:
    return json.dumps({"serving": serving, **dict(rows)}, indent=2) + "\n"
