"""The access log line as a collector reads it from the worker's stdout (a pipe here)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading

import pytest

from agent_proxy.logs import ACCESS, AccessLog, LineBatch, LineWriter

FIELDS = {
    "request_id": "5f2a-1", "direction": "northbound", "client_ip": "10.0.0.2", "method": "GET",
    "target": '/a "quoted" \\ path/é\n', "status": 200, "bytes_in": 0, "bytes_out": 1234, "duration_ms": 0.612,
}


@pytest.fixture
def pipe():
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_json_line_is_one_object_with_every_field(pipe):
    read, write = pipe
    AccessLog("info", "json", LineWriter(write)).write(FIELDS)
    line = os.read(read, 65536).decode()
    assert line.endswith("\n") and line.count("\n") == 1
    entry = json.loads(line)
    assert entry.pop("level") == "info" and entry.pop("logger") == ACCESS and entry.pop("message") == "request"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.pop("ts"))
    assert entry == FIELDS


def test_values_that_are_not_strings_or_numbers_stay_valid_json(pipe):
    read, write = pipe
    AccessLog("info", "json", LineWriter(write)).write({"missing": None, "flag": True, "listed": ["a", 1]})
    entry = json.loads(os.read(read, 65536))
    assert (entry["missing"], entry["flag"], entry["listed"]) == (None, True, ["a", 1])


def test_a_text_line_names_each_field(pipe):
    read, write = pipe
    AccessLog("info", "text", LineWriter(write)).write({"status": 200, "target": "/x"})
    line = os.read(read, 65536).decode()
    assert re.fullmatch(rf"\S+Z info {ACCESS}: request status=200 target=/x\n", line)


def test_above_info_the_access_log_is_off():
    assert not AccessLog("warning", "json", LineWriter(1)).enabled
    assert AccessLog("debug", "json", LineWriter(1)).enabled


def test_a_batch_writes_every_line_whole_and_in_order_when_flushed(pipe):
    read, write = pipe
    batch = LineBatch(fd=write)
    log = AccessLog("info", "json", batch)

    def serve(thread: int):
        for n in range(200):
            log.write({"thread": thread, "n": n, "target": "/" + "x" * (n % 97)})

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):
        os.read(read, 1)  # nothing is written before the flush
    reader = threading.Thread(target=lambda: received.append(_read_all(read)))
    received: list[bytes] = []
    reader.start()
    batch.flush()
    os.close(write)
    reader.join(10)
    entries = [json.loads(line) for line in received[0].decode().splitlines()]
    assert len(entries) == 800
    for thread in range(4):
        assert [e["n"] for e in entries if e["thread"] == thread] == list(range(200))


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
