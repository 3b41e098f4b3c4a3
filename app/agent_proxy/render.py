"""Render the node front, balancer and firewall templates.

Each template exists once, at the top of the repository (``haproxy/``, ``firewall/``);
an installed wheel carries a copy under ``agent_proxy/templates``. The CLI, the Ansible
roles and the image all render through here, so they produce the same files.

A template sees ``config`` (the parsed :class:`~agent_proxy.config.Config`),
``worker_ports`` (the local workers' ports), ``upstream`` (``upstream.url`` taken apart
as the workers use it), ``errors`` (the error catalogue, errors.CATALOGUE) and
``error_body(code, description)`` (an error's JSON body, as the workers write it, with
' and $ as JSON escapes so that it sits in a single-quoted HAProxy or nginx string), and
any extra variables the caller passes
(``--set key=value`` or ``--vars FILE`` on the command line); each template documents the
extra variables it reads in its header comment.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
import yaml

from . import errors, relay
from .config import Config, ConfigError, is_address, load_yaml, shown, yaml_problem

# CLI name -> template path relative to the template root.
TEMPLATES = {
    "node-haproxy": "haproxy/node-haproxy.cfg.j2",
    "node-haproxy-key": "haproxy/node-haproxy-key.map.j2",
    "lb-haproxy": "haproxy/lb-haproxy.cfg.j2",
    "node-nginx": "haproxy/node-nginx.conf.j2",
    "keepalived": "haproxy/keepalived.conf.j2",
    "firewall-node": "firewall/node.rules.j2",
    "firewall-gateway": "firewall/gateway.rules.j2",
    "firewall-node6": "firewall/node6.rules.j2",
    "firewall-gateway6": "firewall/gateway6.rules.j2",
}


def template_root() -> Path:
    """The folder holding haproxy/ and firewall/: the installed copy, else the checkout."""
    installed = Path(__file__).with_name("templates")
    if (installed / "haproxy").is_dir():
        return installed
    return Path(__file__).resolve().parents[2]


class MissingVariables(Exception):
    """Variables a template needs and the caller did not pass; ``names`` in order of use."""

    def __init__(self, names: list[str]):
        self.names = names
        quoted = ", ".join(f"'{name}'" for name in names)
        super().__init__(f"missing variable: {quoted} is undefined" if len(names) == 1
                         else f"missing variables: {quoted} are undefined")


def _recording_undefined(missing: list[str]) -> type[jinja2.Undefined]:
    """An Undefined that notes each missing variable where it is used and lets the
    rendering go on, so that one try names them all; ``default`` and ``is defined`` work
    as ever. Anything it cannot stand in for (arithmetic, a call) still fails at once."""

    class Recording(jinja2.StrictUndefined):
        __slots__ = ()

        def _note(self) -> None:
            if self._undefined_obj is jinja2.utils.missing and self._undefined_name not in missing:
                missing.append(self._undefined_name)
            elif self._undefined_obj is not jinja2.utils.missing:
                self._fail_with_undefined_error()

        def __str__(self) -> str:
            self._note()
            return ""

        def __iter__(self):
            self._note()
            return iter(())

        def __bool__(self) -> bool:
            self._note()
            return False

        def __len__(self) -> int:
            self._note()
            return 0

    return Recording


def environment(root: Path | None = None, undefined: type[jinja2.Undefined] = jinja2.StrictUndefined) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root or template_root())),
        undefined=undefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def upstream_parts(config: Config) -> dict[str, Any]:
    """``upstream.url`` as the workers relay to it (the same relay.Origin): scheme, host,
    port, the Host header's value (authority) and the path prefix joined before every target."""
    origin = relay.Origin.from_url(config.upstream.url, config.upstream.timeouts())
    return {
        "scheme": origin.scheme, "host": origin.bracketed_host, "port": origin.port, "is_ip": is_address(origin.host),
        "authority": origin.authority, "prefix": urlsplit(config.upstream.url).path.rstrip("/"),
    }


def read_variables(path: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """Template variables from a YAML mapping file (``--vars``, the firewall's and the front's
    variables on a node); {} for a missing file when ``missing_ok``. Raises ConfigError."""
    try:
        loaded = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError([f"{path}: cannot read the template variables: no such file"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: cannot read the template variables: {yaml_problem(exc)}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the template variables: {getattr(exc, 'strerror', None) or exc}"]) from None
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: the template variables must be a mapping"])
    return loaded


# A variable's text goes into the file as it is: one word, without the characters that
# end a word or start a comment, a string or a block in HAProxy, nginx, keepalived or
# iptables-restore syntax. Only a command may hold spaces, and nothing may hold a line break.
_WORD = re.compile(r"[^\s;#\"'{}\\$`]*")
_LINE = re.compile(r"[^\x00-\x1f\x7f]*")
_COMMANDS = {"check_command"}


def check_variables(variables: dict[str, Any]) -> None:
    """Raise ConfigError naming each variable whose text could change the rendered file's
    syntax: ``--set 'nodes=[{name: "a\\nbind :80"}]'`` must not add a listener."""
    problems: list[str] = []

    def check(value: Any, where: str, command: bool) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{where}.{key}", command)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                check(item, f"{where}[{index}]", command)
        elif isinstance(value, str) and not (_LINE if command else _WORD).fullmatch(value):
            what = "a line break or control character" if command else "a space, a line break or one of ; # \" ' { } \\ $ `"
            problems.append(f"template variable {where}: {shown(value)} holds {what}")

    for name, value in variables.items():
        check(value, str(name), name in _COMMANDS)
    if problems:
        raise ConfigError(problems)


def number_over(limit: int) -> str:
    """A regular expression matching the decimal numbers greater than ``limit`` (leading
    zeros allowed), for a config that must compare a number it cannot hold: HAProxy
    2.6's ``req.hdr_val`` reads a Content-Length as a 32-bit integer, and 2**32 + 1000
    wraps to 1000."""
    digits = str(limit)
    longer = f"[1-9][0-9]{{{len(digits)},}}"
    same_length = [f"{digits[:i]}[{int(d) + 1}-9][0-9]{{{len(digits) - i - 1}}}"
                   for i, d in enumerate(digits) if d != "9"]
    return "^0*(?:" + "|".join([longer, *same_length]) + ")$"


def _quotable_error_body(code: str, description: str) -> str:
    """errors.body() for a single-quoted config string: ' and $ (nginx variables) escaped."""
    return errors.body(code, description).decode().replace("'", "\\u0027").replace("$", "\\u0024")


def render(name: str, config: Config, variables: dict[str, Any] | None = None) -> str:
    """Render the template known as ``name`` (see TEMPLATES) for ``config``."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; one of: {', '.join(TEMPLATES)}")
    context = {"config": config, "worker_ports": config.worker_ports(), "upstream": upstream_parts(config),
               "errors": errors.CATALOGUE, "error_body": _quotable_error_body, "number_over": number_over}
    if name == "node-haproxy-key":  # read only for the one template that holds it
        context["secret_base64"] = base64.b64encode(config.read_secret()).decode()
    check_variables(variables or {})
    context.update(variables or {})
    missing: list[str] = []
    try:
        text = environment(undefined=_recording_undefined(missing)).get_template(TEMPLATES[name]).render(context)
    except jinja2.UndefinedError:
        if not missing:
            raise
    if missing:
        raise MissingVariables(missing)
    return text
