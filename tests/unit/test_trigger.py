"""The worker's wake-up pipe: pulls coalesce, and none is ever lost.

A lost pull leaves the main loop asleep in poll() until its 0.2 s timeout while a
finished request waits; the pipe is a real pipe, read the way the main loop reads it.
"""

from __future__ import annotations

import select

import pytest
from waitress import trigger

from agent_proxy.server import Trigger


@pytest.fixture
def pipe_trigger():
    wake = trigger.trigger({})
    wake.__class__ = Trigger
    yield wake
    wake.close()


def pending(wake) -> bool:
    return bool(select.select([wake.socket.fd], [], [], 0)[0])


def test_pulls_before_the_loop_reads_write_one_byte(pipe_trigger):
    for _ in range(5):
        pipe_trigger.pull_trigger()
    assert pipe_trigger.recv(8192) == b"x"
    assert not pending(pipe_trigger)


def test_a_pull_after_the_loop_read_the_pipe_wakes_it_again(pipe_trigger):
    pipe_trigger.pull_trigger()
    pipe_trigger.handle_read()
    assert not pending(pipe_trigger)
    pipe_trigger.pull_trigger()
    assert pending(pipe_trigger)


def test_a_pull_racing_the_read_is_not_lost(pipe_trigger):
    """A task ends while the main loop reads the pipe: the loop still wakes for the next pull."""
    read = pipe_trigger.socket.recv

    def read_while_a_task_pulls(*args):
        pipe_trigger.pull_trigger()
        return read(*args)

    pipe_trigger.pull_trigger()
    pipe_trigger.socket.recv = read_while_a_task_pulls
    pipe_trigger.handle_read()
    pipe_trigger.socket.recv = read
    pipe_trigger.pull_trigger()
    assert pending(pipe_trigger)
