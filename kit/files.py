"""Files that hold a secret (a key, the shared secret, the front's signing key map)."""

from __future__ import annotations

from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """``data`` into ``path``, mode 0600 from before the first byte and replaced in one
    rename: the product's own writer (agent_proxy.files), so the kit writes secrets as the
    appliance does."""
    from agent_proxy.files import replace   # the product, imported when a secret is written
    replace(path, data, 0o600)
