"""Render the node front, balancer and firewall templates.

Each template exists once, at the top of the repository (``haproxy/``, ``firewall/``);
an installed wheel carries a copy under ``agent_proxy/templates``. The CLI, the Ansible
roles and the image all render through here, so they produce the same files.

A template sees ``config`` (the parsed :class:`~agent_proxy.config.Config`),
``worker_ports`` (the local workers' ports), ``upstream`` (``upstream.url`` taken apart
as the workers use it) and any extra variables the caller passes
(``--set key=value`` or ``--vars FILE`` on the command line); each template documents the
extra variables it reads in its header comment.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2

from .config import Config, is_address

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


def environment(root: Path | None = None) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root or template_root())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def upstream_parts(config: Config) -> dict[str, Any]:
    """``upstream.url`` as the workers relay to it (app.Proxy): scheme, host, port, the
    Host header's value (authority) and the path prefix joined before every target."""
    url = urlsplit(config.upstream.url)
    default = 443 if url.scheme == "https" else 80
    port = url.port or default
    host = url.hostname
    bracketed = f"[{host}]" if ":" in host else host
    return {
        "scheme": url.scheme, "host": bracketed, "port": port, "is_ip": is_address(host),
        "authority": bracketed if port == default else f"{bracketed}:{port}",
        "prefix": url.path.rstrip("/"),
    }


def render(name: str, config: Config, variables: dict[str, Any] | None = None) -> str:
    """Render the template known as ``name`` (see TEMPLATES) for ``config``."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; one of: {', '.join(TEMPLATES)}")
    context = {"config": config, "worker_ports": config.worker_ports(), "upstream": upstream_parts(config)}
    if name == "node-haproxy-key":  # read only for the one template that holds it
        context["secret_base64"] = base64.b64encode(config.read_secret()).decode()
    context.update(variables or {})
    return environment().get_template(TEMPLATES[name]).render(context)
