"""Merging the workers' registries into one node-wide answer (the rules in metrics.FAMILIES)."""

from prometheus_client.parser import text_string_to_metric_families

from agent_proxy.metrics import Metrics, scrape_node


def parsed(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_a_sibling_that_does_not_answer_is_left_out_and_counted_missing():
    own, sibling = Metrics("8002"), Metrics("8003")
    own.observe("northbound", 200, 0.01, 0, 10)
    sibling.observe("northbound", 200, 0.01, 0, 10)
    sibling.observe("northbound", 200, 0.01, 0, 10)

    def fetch(host, port):
        if port == 8004:
            raise OSError("connection refused")
        return list(text_string_to_metric_families(sibling.render().decode()))

    found = parsed(scrape_node(own, [("127.0.0.1", 8003), ("127.0.0.1", 8004)], fetch))
    assert found[("agent_proxy_requests_total", (("code", "200"), ("direction", "northbound")))] == 3
    assert found[("agent_proxy_workers", ())] == 3 and found[("agent_proxy_workers_scraped", ())] == 2


def test_gauges_merge_by_their_rule():
    own, sibling = Metrics("8002"), Metrics("8003")
    own.certificate_expiry.labels("front").set(2000)
    sibling.certificate_expiry.labels("front").set(1000)
    own.upstream_ready.set(0)
    sibling.upstream_ready.set(1)
    own.max_in_flight.set(64)
    sibling.max_in_flight.set(64)
    found = parsed(scrape_node(own, [("127.0.0.1", 8003)], lambda h, p: list(text_string_to_metric_families(sibling.render().decode()))))
    assert found[("agent_proxy_certificate_expiry_timestamp_seconds", (("certificate", "front"),))] == 1000  # min
    assert found[("agent_proxy_upstream_ready", ())] == 1  # max
    assert found[("agent_proxy_max_in_flight", ())] == 128  # sum


def test_latency_histograms_match_prometheus_clients_own():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from agent_proxy.metrics import LATENCY_BUCKETS

    reference_registry = CollectorRegistry()
    reference = Histogram("agent_proxy_request_duration_seconds", "x", ["direction"], registry=reference_registry, buckets=LATENCY_BUCKETS)
    ours = Metrics("8002")
    for seconds in (0.0005, 0.001, 0.0011, 0.01, 0.3, 1.0, 59.9, 61.0):  # on, between and past the bounds
        reference.labels("northbound").observe(seconds)
        ours.observe("northbound", 200, seconds, 0, 0, seconds / 4)

    def buckets(text: bytes, name: str) -> dict:
        return {k: v for k, v in parsed(text).items() if k[0].startswith(name) and not k[0].endswith("_created")}

    expected = buckets(generate_latest(reference_registry), "agent_proxy_request_duration_seconds")
    assert buckets(ours.render(), "agent_proxy_request_duration_seconds") == expected
    origin = buckets(ours.render(), "agent_proxy_origin_duration_seconds")
    assert origin[("agent_proxy_origin_duration_seconds_count", (("direction", "northbound"),))] == 8
