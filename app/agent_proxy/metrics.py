"""Prometheus metrics: one registry per worker, one scrape per node.

Each worker counts in a registry of its own (no global state, nothing shared between
processes on the request path). A scrape of ``/_proxy/metrics`` on any worker answers
for the whole node: that worker asks its siblings for their own registries
(``?scope=worker``, over loopback) and merges them by the rule each family declares in
``FAMILIES`` below. Merging costs the scrape a few loopback requests and a relayed
request nothing; prometheus_client's multiprocess mode would instead write every
increment to a memory-mapped file, cannot run process collectors or callback gauges, and
leaves files behind every restarted worker.

``FAMILIES`` is the one list of what a node exports: the README's metrics table is
generated from it and a test compares it with what a real node answers. Labels are
bounded: direction is one of four words, code an HTTP status, kind and reason a few words.
"""

from __future__ import annotations

import bisect
import http.client
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.parser import text_string_to_metric_families

from . import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WORKER_LABEL = "worker"
# How long a scrape waits for one sibling worker before leaving it out.
SIBLING_TIMEOUT = 2.0


@dataclass(frozen=True)
class Family:
    """One exported metric family and how a node-wide scrape merges the workers' values.

    merge: ``sum`` (counts), ``max``, ``min``, ``per-worker`` (kept apart with a
    ``worker`` label: the port of the worker it describes) or ``node`` (made by the merge).
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    merge: str
    meaning: str


FAMILIES = (
    Family("agent_proxy_build_info", "gauge", ("version", "python"), "max",
           "1, labelled with the running version (two during a rolling upgrade)"),
    Family("agent_proxy_requests_total", "counter", ("direction", "code"), "sum",
           "requests answered, by direction (northbound, southbound, control, local) and HTTP status"),
    Family("agent_proxy_request_duration_seconds", "histogram", ("direction",), "sum",
           "time from request to the last byte of the answer"),
    Family("agent_proxy_origin_duration_seconds", "histogram", ("direction",), "sum",
           "relayed requests: time spent on the origin (connect, send, wait for the answer's head; "
           "small answers' bodies too)"),
    Family("agent_proxy_proxy_duration_seconds", "histogram", ("direction",), "sum",
           "relayed requests: the rest of the request's time in the proxy (checks, signing, "
           "relaying the answer; streamed bodies)"),
    Family("agent_proxy_request_bytes_total", "counter", ("direction",), "sum", "body bytes received from clients"),
    Family("agent_proxy_response_bytes_total", "counter", ("direction",), "sum", "body bytes sent back to clients"),
    Family("agent_proxy_origin_errors_total", "counter", ("direction", "kind"), "sum",
           "upstream (northbound) or agent (southbound) failures before an answer's head was relayed: "
           "kind unreachable, timeout, closed (before answering) or bad-answer (broke HTTP/1.1)"),
    Family("agent_proxy_truncated_answers_total", "counter", ("direction",), "sum",
           "answers cut off after their head was relayed (the origin's body broke or stalled): "
           "the client's connection was closed short"),
    Family("agent_proxy_rejected_total", "counter", ("reason",), "sum",
           "requests refused before relaying: reason source, signature or overload"),
    Family("agent_proxy_held_requests", "gauge", (), "sum",
           "requests being served or queued for a thread"),
    Family("agent_proxy_max_in_flight", "gauge", (), "sum",
           "requests the workers may hold at once (limits.max_in_flight each); past it, 503"),
    Family("agent_proxy_upstream_ready", "gauge", (), "max",
           "1 when the upstream answered within upstream.ready_window (probed at most every 2 s), else 0"),
    Family("agent_proxy_feature_failed", "gauge", ("feature",), "max",
           "1 when a feature is failed (its reason is in /_proxy/ready and /_proxy/v2/features)"),
    Family("agent_proxy_certificate_expiry_timestamp_seconds", "gauge", ("certificate",), "min",
           "when a certificate the proxy presents expires (Unix time): certificate front (tls.cert_file) "
           "or upstream-client (upstream.client_cert)"),
    Family("agent_proxy_workers", "gauge", (), "node", "workers configured on this node (front.workers)"),
    Family("agent_proxy_workers_scraped", "gauge", (), "node", "workers whose counts this scrape holds"),
    Family("process_cpu_seconds_total", "counter", (WORKER_LABEL,), "per-worker", "CPU time of one worker"),
    Family("process_resident_memory_bytes", "gauge", (WORKER_LABEL,), "per-worker", "resident memory of one worker"),
    Family("process_virtual_memory_bytes", "gauge", (WORKER_LABEL,), "per-worker", "virtual memory of one worker"),
    Family("process_start_time_seconds", "gauge", (WORKER_LABEL,), "per-worker", "when one worker started (Unix time)"),
    Family("process_open_fds", "gauge", (WORKER_LABEL,), "per-worker", "open file descriptors of one worker"),
    Family("process_max_fds", "gauge", (WORKER_LABEL,), "per-worker", "the file descriptor limit of one worker"),
)
_MERGE = {f.name.removesuffix("_total"): f.merge for f in FAMILIES}
_MEANING = {f.name: f.meaning for f in FAMILIES}


class Metrics:
    """One worker's registry; ``worker`` names it in a node's merged scrape (its port)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker: str = "0"):
        self.worker = worker
        self.registry = registry = CollectorRegistry(auto_describe=True)
        kinds = {"counter": Counter, "gauge": Gauge}
        made = {}
        for family in FAMILIES:
            if family.merge in ("per-worker", "node") or family.kind == "histogram":
                continue
            made[family.name] = kinds[family.kind](family.name, family.meaning, family.labels, registry=registry)
        self.latency = Latency(LATENCY_BUCKETS)
        registry.register(self.latency)
        ProcessCollector(registry=registry)
        made["agent_proxy_build_info"].labels(__version__, sys.version.split()[0]).set(1)
        self.requests = made["agent_proxy_requests_total"]
        self.bytes_in = made["agent_proxy_request_bytes_total"]
        self.bytes_out = made["agent_proxy_response_bytes_total"]
        self.origin_errors = made["agent_proxy_origin_errors_total"]
        self.truncated = made["agent_proxy_truncated_answers_total"]
        self.rejected = made["agent_proxy_rejected_total"]
        self.held = made["agent_proxy_held_requests"]
        self.max_in_flight = made["agent_proxy_max_in_flight"]
        self.upstream_ready = made["agent_proxy_upstream_ready"]
        self.feature_failed = made["agent_proxy_feature_failed"]
        self.certificate_expiry = made["agent_proxy_certificate_expiry_timestamp_seconds"]
        # Every series an alert may ask for exists from the start, at 0 (a rate needs two points).
        for direction in ("northbound", "southbound"):
            for kind in ("unreachable", "timeout", "closed", "bad-answer"):
                self.origin_errors.labels(direction, kind)
            self.truncated.labels(direction)
        for reason in ("source", "signature", "overload"):
            self.rejected.labels(reason)
        self._children: dict = {}

    def observe(self, direction: str, status: int, seconds: float, bytes_in: int, bytes_out: int,
                origin_seconds: float | None = None) -> None:
        key = (direction, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(direction, str(status)),
                self.bytes_in.labels(direction),
                self.bytes_out.labels(direction),
            )
        requests, received, sent = children
        requests.inc()
        self.latency.observe(direction, seconds, origin_seconds)
        if bytes_in:
            received.inc(bytes_in)
        if bytes_out:
            sent.inc(bytes_out)

    def render(self) -> bytes:
        """This worker alone (``?scope=worker``)."""
        return render_merged([(self.worker, list(self.registry.collect()))])


class Latency:
    """The three latency histograms (request, origin, proxy time) by direction, as a collector.

    Plain bucket counts under one lock per request: prometheus_client's Histogram.observe
    takes a lock per bucket update and sum, and three of them cost a relayed request
    ~3 times what this does (measured side by side with timeit; see the README).
    """

    NAMES = ("agent_proxy_request_duration_seconds", "agent_proxy_origin_duration_seconds",
             "agent_proxy_proxy_duration_seconds")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.lock = threading.Lock()
        # direction -> the three histograms' [count per bucket (the last one +Inf)..., sum]
        self.series: dict[str, tuple[list, list, list]] = {}

    def observe(self, direction: str, seconds: float, origin_seconds: float | None = None) -> None:
        bucket = bisect.bisect_left
        with self.lock:
            series = self.series.get(direction)
            if series is None:
                series = self.series[direction] = tuple([0] * (len(self.bounds) + 1) + [0.0] for _ in self.NAMES)
            total = series[0]
            total[bucket(self.bounds, seconds)] += 1
            total[-1] += seconds
            if origin_seconds is not None:
                proxy_seconds = max(seconds - origin_seconds, 0.0)
                origin, proxy = series[1], series[2]
                origin[bucket(self.bounds, origin_seconds)] += 1
                origin[-1] += origin_seconds
                proxy[bucket(self.bounds, proxy_seconds)] += 1
                proxy[-1] += proxy_seconds

    def describe(self):
        return [HistogramMetricFamily(name, _MEANING[name], labels=["direction"]) for name in self.NAMES]

    def collect(self):
        families = self.describe()
        with self.lock:
            snapshot = {(index, direction): list(series[index])
                        for direction, series in self.series.items() for index in range(len(self.NAMES))}
        for (index, direction), series in sorted(snapshot.items()):
            if not any(series[:-1]):
                continue  # a direction that was never relayed has no origin or proxy time
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds + (float("inf"),), series[:-1]):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            families[index].add_metric([direction], buckets, series[-1])
        return families


# -- one scrape per node


def fetch_worker(host: str, port: int, timeout: float = SIBLING_TIMEOUT) -> list[Metric]:
    """A sibling worker's own families; raises OSError or ValueError when it cannot answer."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/_proxy/metrics?scope=worker", headers={"Host": f"{host}:{port}"})
        response = connection.getresponse()
        body = response.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from None
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"answered {response.status}")
    return list(text_string_to_metric_families(body.decode()))


def scrape_node(own: Metrics, siblings: list[tuple[str, int]],
                fetch: Callable[[str, int], list[Metric]] = fetch_worker) -> bytes:
    """Every worker's families merged into one answer; a worker that does not answer is left out."""
    parts = [(own.worker, list(own.registry.collect()))]
    if siblings:
        with ThreadPoolExecutor(max_workers=min(len(siblings), 8)) as pool:
            futures = [(port, pool.submit(fetch, host, port)) for host, port in siblings]
            for port, future in futures:
                try:
                    parts.append((str(port), future.result()))
                except (OSError, ValueError):
                    continue
    nodes = [
        _gauge("agent_proxy_workers", len(siblings) + 1),
        _gauge("agent_proxy_workers_scraped", len(parts)),
    ]
    return render_merged(parts, nodes)


def _gauge(name: str, value: float) -> Metric:
    metric = Metric(name, _MEANING[name], "gauge")
    metric.add_sample(name, {}, value)
    return metric


def render_merged(parts: list[tuple[str, Iterable[Metric]]], extra: list[Metric] = ()) -> bytes:
    """Merge the families of several workers (worker name, families) into Prometheus text.

    ``_created`` samples are dropped: they say when a worker first counted, which means
    nothing once workers are summed.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict] = {}
    for worker, families in parts:
        for family in families:
            rule = _MERGE.get(family.name) or ("sum" if family.type in ("counter", "histogram") else "per-worker")
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = dict(sample.labels)
                if rule == "per-worker":  # a sibling's own answer names itself already
                    labels.setdefault(WORKER_LABEL, worker)
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in samples:
                    samples[key] = [sample.name, labels, sample.value]
                elif rule == "sum":
                    samples[key][2] += sample.value
                elif rule == "max":
                    samples[key][2] = max(samples[key][2], sample.value)
                elif rule == "min":
                    samples[key][2] = min(samples[key][2], sample.value)
    for name, target in merged.items():
        for sample_name, labels, value in values[name].values():
            target.add_sample(sample_name, labels, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(merged.values()) + list(extra)))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def markdown_table() -> str:
    """The README's metrics table, made from FAMILIES (a test keeps the two equal)."""
    lines = ["| metric | type | labels | merged over workers | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in FAMILIES:
        labels = ", ".join(f"`{label}`" for label in f.labels) or "-"
        lines.append(f"| `{f.name}` | {f.kind} | {labels} | {f.merge} | {f.meaning} |")
    return "\n".join(lines) + "\n"
