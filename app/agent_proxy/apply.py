"""`agent-proxy apply`: put an edited configuration into service on this node.

For an operator who changed /etc/agent-proxy/agent-proxy.yaml on the node (and for the
image's first boot). Everything is checked before anything changes:

1. the configuration (as `check-config`, the shared secret included);
2. the node firewall, both families, rendered from it (with the firewall's variables,
   <firewall dir>/vars.yaml) and tested with `iptables-restore --test` /
   `ip6tables-restore --test`;
3. the node front, rendered from it (with the front's variables, /etc/agent-proxy/
   front-vars.yaml, when the node has them: the agent_proxy role writes them) and tested
   with `haproxy -c`; and the front's signing key map, <shared_secret_file>.haproxy-map,
   rendered from the shared secret (root, 0600), so that a rotated secret reaches a
   native front with the reload.

Only then are the rendered files installed and the services reloaded, in this order: the
firewall (so the new sources are admitted before anything serves them), each worker
(SIGHUP: the worker reads the config again), the front. A worker or front that is not
running is started. When a reload fails, the previous firewall, front and key map files
go back and the firewall and front, if already reloaded, are reloaded with them; workers
already reloaded keep the edited config (the file is the operator's, apply keeps no older
one). The exit status is 1 and the message names the step. `--no-reload` stops after
installing (first boot: the services start after it).

The few settings a worker reads only when it starts (README, Operations: Reload; the
worker's "configuration reloaded" log line names them) need
`systemctl restart agent-proxy.target` instead.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import config as configuration, files
from .errors import CommandError
from .render import read_variables, render
from .status import FRONT_UNIT

FIREWALL_DIR = "/etc/agent-proxy/firewall"
FRONT_CONFIG = "/etc/agent-proxy/haproxy.cfg"
# The node front's extra template variables (haproxy/node-haproxy.cfg.j2), written by the
# agent_proxy role from agent_proxy_front_vars; the firewall's are <FIREWALL_DIR>/vars.yaml.
FRONT_VARS = "/etc/agent-proxy/front-vars.yaml"
FIREWALL_UNIT = "agent-proxy-firewall.service"
KEY_MAP_SUFFIX = ".haproxy-map"


@dataclass(frozen=True)
class Artefact:
    """One rendered file: its template, where it goes, its mode, the file of extra template
    variables it is rendered with (if that exists) and the command that tests it (if any)."""

    template: str
    path: Path
    mode: int
    variables: Path | None = None
    test: tuple[str, ...] = ()


def artefacts(config: configuration.Config, firewall_dir: str, front_config: str,
              front_vars: str = FRONT_VARS) -> list[Artefact]:
    fw = Path(firewall_dir)
    return [
        # The native front's signing key (the shared secret in base64), root only like the
        # TLS key: written in either front.mode, so that switching the mode takes no other
        # step, and again by every apply, so that a rotated secret reaches the front.
        Artefact("node-haproxy-key", Path(config.shared_secret_file + KEY_MAP_SUFFIX), 0o600),
        Artefact("firewall-node", fw / "rules.v4", 0o640, fw / "vars.yaml", ("iptables-restore", "--test")),
        Artefact("firewall-node6", fw / "rules.v6", 0o640, fw / "vars.yaml", ("ip6tables-restore", "--test")),
        Artefact("node-haproxy", Path(front_config), 0o644, Path(front_vars), ("haproxy", "-c", "-q", "-f")),
    ]


def _run(argv: list[str] | tuple[str, ...]) -> str | None:
    """Run a command; None when it succeeded, else its last line of output as the reason."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not finish within 120 s"
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def prepare(config: configuration.Config, firewall_dir: str, front_config: str,
            front_vars: str = FRONT_VARS) -> list[tuple[Artefact, Path]]:
    """Render and test every artefact next to its destination (``NAME.new``).

    Returns (artefact, new file) pairs; on any failure removes what it wrote and raises.
    A signing key map that does not exist yet is written in place at once (the new file is
    its destination): `haproxy -c` of a native front reads it there, and there is no
    previous one to keep.
    """
    written: list[tuple[Artefact, Path]] = []
    try:
        for artefact in artefacts(config, firewall_dir, front_config, front_vars):
            variables = read_variables(artefact.variables, missing_ok=True) if artefact.variables else {}
            text = render(artefact.template, config, variables)
            if artefact.template == "node-haproxy-key" and not artefact.path.exists():
                files.replace(artefact.path, text, artefact.mode)
                new = artefact.path
            else:
                new = files.stage(artefact.path, text, artefact.mode)
            written.append((artefact, new))
            reason = _run([*artefact.test, str(new)]) if artefact.test else None
            if reason:
                raise CommandError(f"{artefact.template} rendered from {config.source} does not pass {artefact.test[0]}: {reason}")
    except OSError as exc:
        _discard(written)
        raise CommandError(f"cannot write {exc.filename}: {exc.strerror}") from None
    except BaseException:
        _discard(written)
        raise
    return written


def _discard(written: list[tuple[Artefact, Path]]) -> None:
    for _, new in written:
        new.unlink(missing_ok=True)


def _install(written: list[tuple[Artefact, Path]]) -> dict[Path, Path | None]:
    """Move each new file into place; returns destination -> kept previous copy (or None)."""
    previous: dict[Path, Path | None] = {}
    for artefact, new in written:
        old = artefact.path.with_name(artefact.path.name + ".previous")
        if new == artefact.path:  # written in place by prepare: there was none before
            previous[artefact.path] = None
            continue
        if artefact.path.exists():
            artefact.path.replace(old)
            previous[artefact.path] = old
        else:
            previous[artefact.path] = None
        new.replace(artefact.path)
    return previous


def _restore(previous: dict[Path, Path | None]) -> None:
    for path, old in previous.items():
        if old is None:
            path.unlink(missing_ok=True)
        else:
            old.replace(path)


def _drop_previous(previous: dict[Path, Path | None]) -> None:
    """The change stands: the kept copies go."""
    for old in previous.values():
        if old is not None:
            old.unlink()


def _reload_steps(config: configuration.Config) -> list[tuple[str, list[str]]]:
    steps = [("firewall", ["systemctl", "reload-or-restart", FIREWALL_UNIT])]
    steps += [
        (f"worker {port}", ["systemctl", "reload-or-restart", f"agent-proxy@{port}.service"])
        for port in config.worker_ports()
    ]
    steps.append(("front", ["systemctl", "reload-or-restart", FRONT_UNIT]))
    return steps


def apply(config_path: str, firewall_dir: str = FIREWALL_DIR, front_config: str = FRONT_CONFIG,
          reload: bool = True, front_vars: str = FRONT_VARS) -> list[str]:
    """Check, render, test, install, reload. Returns the lines to print; raises on failure."""
    config = configuration.load(config_path)
    config.read_secret()
    lines = [f"{config.source}: ok (proxy_id {config.proxy_id})"]
    lines += [f"warning: {config.source}: {w}" for w in configuration.warnings(config)]
    written = prepare(config, firewall_dir, front_config, front_vars)
    lines.append("tested: " + ", ".join(f"{a.path} ({a.test[0]})" for a, _ in written if a.test))
    previous = _install(written)
    if not reload:
        _drop_previous(previous)
        lines.append("installed; nothing reloaded (--no-reload)")
        return lines
    done: list[tuple[str, list[str]]] = []
    for name, argv in _reload_steps(config):
        reason = _run(argv)
        if reason:
            _restore(previous)
            undone = [n for n, a in done if a[-1] in (FIREWALL_UNIT, FRONT_UNIT) and _run(a) is None]
            back = f"; the previous firewall and front files are back ({', '.join(undone) or 'nothing'} reloaded with them)"
            raise CommandError(f"reloading the {name} failed: {reason}{back}")
        done.append((name, argv))
    _drop_previous(previous)
    lines.append("reloaded: " + ", ".join(name for name, _ in done))
    return lines
