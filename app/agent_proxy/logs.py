"""Logging to stdout: one JSON object a line (or plain text), for journald or a collector."""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import sys
import time
from json.encoder import encode_basestring_ascii as _json_string

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


class LineWriter:
    """Where access log lines go: each in one write(2), atomic on a pipe under PIPE_BUF."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdout.fileno() if fd is None else fd

    def add(self, line: bytes) -> None:
        self._write(line)

    def flush(self) -> None:
        """Nothing is held back."""

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # a closed stdout must not fail a request or stop the worker


class LineBatch(LineWriter):
    """Access log lines from the worker threads, written by the worker's main loop.

    One write(2) per request cost ~35 us of a worker's ~300 per relayed request (measured
    with the access log on and off): the system call releases the GIL, and under load each
    release is a handoff between threads. The main loop calls ``flush`` after every pass
    through poll() (at most 0.2 s apart) and once more on the way out. Each write carries
    whole lines and at most PIPE_BUF bytes, so no line is ever split or interleaved on a
    pipe or on journald's socket. A worker killed with SIGKILL loses at most its last pass.
    """

    def __init__(self, fd: int | None = None):
        super().__init__(fd)
        self._lines: collections.deque[bytes] = collections.deque()  # append and popleft are thread-safe

    def add(self, line: bytes) -> None:
        self._lines.append(line)

    def flush(self) -> None:
        lines, chunk, size = self._lines, [], 0
        for _ in range(len(lines)):
            line = lines.popleft()
            if chunk and size + len(line) > select.PIPE_BUF:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))


class AccessLog:
    """One line per request, without the logging module's lock.

    The logging module serialises every record behind a handler lock; at thousands of
    requests a second the worker threads queue on it. Lines go to ``lines``: a
    ``LineBatch`` in a worker, by default a ``LineWriter`` on stdout.
    The line is built by hand, a JSON string escaped only where a value is a string, with
    the timestamp's seconds made once a second: half of what ``json.dumps`` of the record
    and a ``strftime`` per line cost (measured: ~5 against ~11 us a line).
    """

    def __init__(self, level: str = "info", fmt: str = "json", lines: LineWriter | None = None, health: bool = True):
        self.enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self.health = health  # lines for health checks too (logging.access_health)
        self.json = fmt == "json"
        self.lines = lines or LineWriter()
        self._clock = (0, "")  # (a second, that second formatted): one tuple, so threads see a matching pair
        self._json_start = f'", "level": "info", "logger": "{ACCESS}", "message": "request"'
        self._text_start = f" info {ACCESS}: request"

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        clock = self._clock
        if clock[0] != second:
            clock = self._clock = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{clock[1]}.{int((now - second) * 1000):03d}Z"

    def write(self, fields: dict) -> None:
        if self.json:
            parts = [f'{{"ts": "{self._timestamp()}{self._json_start}']
            for key, value in fields.items():
                parts.append(f'"{key}": {_json_string(value) if isinstance(value, str) else _json_scalar(value)}')
            line = ", ".join(parts) + "}\n"
        else:
            line = self._timestamp() + self._text_start + "".join(f" {k}={v}" for k, v in fields.items()) + "\n"
        self.lines.add(line.encode())


def _json_scalar(value) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, default=str)


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    """Log ``message`` with structured ``fields`` (they become JSON keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
