"""Logging to stdout: one JSON object a line (or plain text), for journald or a collector."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

ACCESS = "agent_proxy.access"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.formatTime(record)} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        return f"{line} {extra}" if extra else line


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("waitress").setLevel(logging.WARNING)
    # waitress warns on every request that waits for a thread; under load that is a flood
    # of lines (and a lock every worker thread queues on). The in-flight gauge says it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


class AccessLog:
    """One line per request, written with a single write(2) and no lock.

    The logging module serialises every record behind a handler lock; at thousands of
    requests a second the worker threads queue on it. A line under PIPE_BUF (4 KiB) is
    written atomically to a pipe (journald, a collector), so the access log skips it.
    """

    def __init__(self, level: str = "info", fmt: str = "json", fd: int | None = None):
        self.enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self.json = fmt == "json"
        self.fd = sys.stdout.fileno() if fd is None else fd

    def write(self, fields: dict) -> None:
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if self.json:
            line = json.dumps({"ts": ts, "level": "info", "logger": ACCESS, "message": "request", **fields})
        else:
            line = f"{ts} info {ACCESS}: request " + " ".join(f"{k}={v}" for k, v in fields.items())
        try:
            os.write(self.fd, (line + "\n").encode())
        except OSError:
            pass  # a closed stdout must not fail the request


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    """Log ``message`` with structured ``fields`` (they become JSON keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
