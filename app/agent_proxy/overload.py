"""Bounding what one worker holds: past ``limits.max_in_flight``, 503 at once.

waitress queues every request that finds no free thread, so with a slow upstream the
queue, and with it the latency, grows without bound. This dispatcher counts the requests
being served plus those queued; past the bound, a connection goes to a reject thread of
its own instead of the queue, and the app answers it 503 with ``Retry-After`` straight
away (``rejecting()`` tells the app it is running on that thread).
"""

from __future__ import annotations

import logging
import queue
import threading

from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger("agent_proxy.overload")
_local = threading.local()


def rejecting() -> bool:
    """True on the reject thread: the request must be refused at once."""
    return getattr(_local, "rejecting", False)


class BoundedDispatcher(ThreadedTaskDispatcher):
    def __init__(self, max_held: int):
        super().__init__()
        self.max_held = max_held
        self._rejects: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._reject_loop, name="agent-proxy-reject", daemon=True).start()

    def held(self) -> int:
        return self.active_count + len(self.queue)

    def add_task(self, task) -> None:
        with self.lock:
            if self.held() < self.max_held:
                self.queue.append(task)
                self.queue_cv.notify()
                return
        self._rejects.put(task)

    def _reject_loop(self) -> None:
        _local.rejecting = True
        while True:
            task = self._rejects.get()
            if task is None:
                return
            try:
                task.service()
            except Exception:
                log.exception("refusing an overload request failed")

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        self._rejects.put(None)
        return super().shutdown(cancel_pending, timeout)
