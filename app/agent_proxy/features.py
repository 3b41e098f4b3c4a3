"""The proxy's features, Foreman smart-proxy v2 style, with states computed from reality.

Each feature is ``{state, http_enabled, https_enabled, settings, capabilities}``:

* ``state``: ``running``; ``disabled`` when the config leaves it off (registration
  without ``public_url``); ``failed`` when a prerequisite fails, with ``reason``: at start
  or reload (an unreadable CA file, no agent port: ``Config.failed_features``) or found
  while running (the readiness probe finds the upstream's certificate untrusted). The
  worker starts either way; ``/_proxy/ready`` names what failed.
* ``http_enabled`` / ``https_enabled``: how the feature is reached. Agents reach the
  node front over TLS only; the upstream reaches the proxy at ``public_url``.
* ``capabilities``: what this node actually serves (agent ports, TLS modes), not a fixed
  list, so that the upstream can compare them with what it expects.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .config import Config

NAMES = ("northbound", "southbound", "registration", "metrics")


def feature_map(config: Config, failures: dict[str, str]) -> dict:
    """The v2 answer for ``config``, with ``failures`` (feature -> reason) marked failed."""
    upstream_scheme = urlsplit(config.upstream.url).scheme
    control_scheme = urlsplit(config.public_url).scheme if config.public_url else "https"
    northbound_caps = ["hmac-sha256", "streaming", "chunked-requests",
                       "upstream-tls" if upstream_scheme == "https" else "upstream-plain-http"]
    if config.upstream.client_cert:
        northbound_caps.append("upstream-client-certificate")
    southbound_caps = ["hmac-sha256", "streaming"]
    southbound_caps.append(("agent-tls-verified" if config.agents.verify else "agent-tls") if config.agents.tls else "agent-plain-http")
    southbound_caps += [f"agent-port-{port}" for port in config.agents.ports]
    if config.listen_control:
        southbound_caps.append("control-listener")
    features = {
        "northbound": {
            "settings": {"upstream_url": config.upstream.url, "proxy_id": config.proxy_id},
            "capabilities": northbound_caps,
            "scheme": "https",  # agents reach the node front over TLS only
        },
        "southbound": {
            "settings": {
                "agent_networks": [str(n) for n in config.networks.agents],
                "agent_ports": list(config.agents.ports),
                "agent_tls": config.agents.tls,
            },
            "capabilities": southbound_caps,
            "scheme": control_scheme,
        },
        "registration": {
            "settings": {"public_url": config.public_url},
            "capabilities": ["handshake-v1"],
            "scheme": control_scheme,
            "disabled": not config.public_url,
        },
        "metrics": {
            "settings": {"path": "/_proxy/metrics"},
            "capabilities": ["prometheus-text", "node-wide"],
            "scheme": control_scheme,
        },
    }
    answer = {}
    for name, f in features.items():
        disabled = f.get("disabled", False)
        state = "disabled" if disabled else "failed" if name in failures else "running"
        entry = {
            "state": state,
            "http_enabled": not disabled and f["scheme"] == "http",
            "https_enabled": not disabled and f["scheme"] == "https",
            "settings": f["settings"],
            "capabilities": f["capabilities"],
        }
        if state == "failed":
            entry["reason"] = failures[name]
        answer[name] = entry
    return answer


def running(features: dict) -> list[str]:
    """The classic ``/features`` list: names of running features."""
    return [name for name, f in features.items() if f["state"] == "running"]
