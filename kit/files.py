"""Files that hold a secret (a key, the shared secret, the front's signing key map)."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """``data`` into ``path``, readable by its owner only from before the first byte: the
    file is created 0600 (an existing one is set to 0600 before it is truncated), so the
    secret never sits at the umask's permissions, as a write then chmod would leave it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(fd, 0o600)
        handle.truncate()
        handle.write(data.encode() if isinstance(data, str) else data)
