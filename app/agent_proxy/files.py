"""Files replaced in one rename, with their mode and owner set before the first byte.

A reader sees the old file or the new one, never half of one, and a secret is never
readable by anyone else for an instant. Every file the proxy's commands replace (config,
certificate, firewall variables, rendered front and firewall, the front's signing key)
goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path


def stage(path: str | os.PathLike, data: bytes | str, mode: int, owner: tuple[int, int] | None = None,
          suffix: str = ".new") -> Path:
    """Write ``data`` to ``<path><suffix>`` next to ``path``, created with ``mode`` (and
    ``owner``, uid and gid) before anything is written; returns it. Nothing is left on failure."""
    path = Path(path)
    staged = path.with_name(path.name + suffix)
    staged.unlink(missing_ok=True)  # a leftover of an interrupted run: created afresh below
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def replace(path: str | os.PathLike, data: bytes | str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename (see stage)."""
    staged = stage(path, data, mode, owner, suffix=".tmp")
    try:
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def keep_owner_and_mode(path: str | os.PathLike, default_mode: int) -> tuple[int, tuple[int, int] | None]:
    """(mode, owner) of the existing ``path``, to replace it alike; ``default_mode`` and the
    caller's own when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return default_mode, None
    return st.st_mode & 0o7777, (st.st_uid, st.st_gid)
