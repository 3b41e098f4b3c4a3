"""Where the programs are, and the one builder of worker configs for tests, lab and bench."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .files import write_private
from .ports import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AGENT_PROXY = str(VENV_BIN / "agent-proxy")
PYTHON = str(VENV_BIN / "python")
SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, section by section (nested dicts merge)."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def write_config(directory: Path, upstream_url: str, **overrides) -> Path:
    """A worker config in ``directory`` (agent-proxy.yaml) with a known secret and a fresh
    certificate; ``overrides`` are sections or keys laid over the defaults below."""
    from agent_proxy.tlsutil import self_signed   # the product, imported when a config is built

    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / "psk", SECRET + "\n")
    cert_file, key_file = directory / "proxy.crt", directory / "proxy.key"
    if not cert_file.exists():
        cert, key = self_signed("localhost", ["localhost", "127.0.0.1"])
        cert_file.write_bytes(cert)
        write_private(key_file, key)
    data = {
        "proxy_id": "site-a",
        "public_url": "https://127.0.0.1:2002",
        "upstream": {"url": upstream_url, "allow_insecure": upstream_url.startswith("http:"),
                     "connect_timeout": 2, "read_timeout": 5},
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "shared_secret_file": str(directory / "psk"),
        "trusted_proxies": ["127.0.0.1"],
        "networks": {"agents": ["127.0.0.0/8"], "upstream": ["127.0.0.0/8"]},
        "logging": {"level": "info", "format": "json"},
    }
    path = directory / "agent-proxy.yaml"
    path.write_text(yaml.safe_dump(merged(data, overrides), sort_keys=False))
    return path
