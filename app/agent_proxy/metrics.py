"""Prometheus metrics of one worker, in a registry of its own (no global state).

Labels are bounded: direction is one of four words, code is an HTTP status, kind one of
a few error kinds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

DIRECTIONS = ("northbound", "southbound", "control", "local")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "agent_proxy_requests", "Requests answered, by direction and status code",
            ["direction", "code"], registry=self.registry,
        )
        self.duration = Histogram(
            "agent_proxy_request_duration_seconds", "Time from request to last byte of the answer",
            ["direction"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.bytes_out = Counter(
            "agent_proxy_response_bytes", "Body bytes sent back to clients", ["direction"], registry=self.registry,
        )
        self.bytes_in = Counter(
            "agent_proxy_request_bytes", "Body bytes received from clients", ["direction"], registry=self.registry,
        )
        self.origin_errors = Counter(
            "agent_proxy_origin_errors", "Upstream or agent failures (connect, timeout)",
            ["direction", "kind"], registry=self.registry,
        )
        self.truncated = Counter(
            "agent_proxy_truncated_answers", "Answers cut off after their head was relayed (the origin's body broke)",
            ["direction"], registry=self.registry,
        )
        self.rejected = Counter(
            "agent_proxy_rejected", "Requests refused before relaying, by reason",
            ["reason"], registry=self.registry,
        )
        self.held = Gauge(
            "agent_proxy_held_requests", "Requests being served or queued for a thread (bounded by limits.max_in_flight)",
            registry=self.registry,
        )
        self._children: dict = {}

    def observe(self, direction: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        key = (direction, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(direction, str(status)),
                self.duration.labels(direction),
                self.bytes_in.labels(direction),
                self.bytes_out.labels(direction),
            )
        requests, duration, received, sent = children
        requests.inc()
        duration.observe(seconds)
        if bytes_in:
            received.inc(bytes_in)
        if bytes_out:
            sent.inc(bytes_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
