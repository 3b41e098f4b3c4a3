"""One scrape per node: /_proxy/metrics through a real HAProxy front answers for both workers."""

from __future__ import annotations

import re

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from agent_proxy.metrics import FAMILIES, markdown_table
from kit import REPO, node_with_origin

REQUESTS = 20


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with node_with_origin(tmp_path_factory) as node:
        yield node


@pytest.fixture(scope="module")
def http(node):
    return urllib3.PoolManager(retries=False, ca_certs=str(node.cert), timeout=urllib3.Timeout(connect=5, read=20))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def scraped(node, http):
    """Counts of each worker alone (asked directly), then one scrape through the front."""
    before = {port: samples(http.request("GET", f"http://127.0.0.1:{port}/_proxy/metrics?scope=worker").data.decode()) for port in node.workers}
    for index in range(REQUESTS):
        # A new connection each time: the front spreads connections over the workers.
        response = urllib3.PoolManager(retries=False, ca_certs=str(node.cert)).request("GET", f"{node.url}/echo?i={index}")
        assert response.status == 200
    each = {port: samples(http.request("GET", f"http://127.0.0.1:{port}/_proxy/metrics?scope=worker").data.decode()) for port in node.workers}
    response = http.request("GET", f"{node.url}/_proxy/metrics")
    assert response.status == 200
    return before, each, response.data.decode()


def test_one_scrape_through_the_front_sums_both_workers(scraped):
    before, each, text = scraped
    node = samples(text)
    counted = {port: value(found, "agent_proxy_requests_total", code="200", direction="northbound")
               - value(before[port], "agent_proxy_requests_total", code="200", direction="northbound")
               for port, found in each.items()}
    assert all(n > 0 for n in counted.values()), f"the front sent every request to one worker: {counted}"
    assert sum(counted.values()) == REQUESTS
    assert value(node, "agent_proxy_requests_total", code="200", direction="northbound") == REQUESTS
    assert value(node, "agent_proxy_workers") == 2 and value(node, "agent_proxy_workers_scraped") == 2
    # Process metrics stay per worker, one series for each.
    assert {dict(k[1])["worker"] for k in node if k[0] == "process_cpu_seconds_total"} == {str(p) for p in each}


def test_relay_latency_is_split_into_origin_and_proxy_time(scraped):
    node = samples(scraped[2])
    for name in ("agent_proxy_origin_duration_seconds", "agent_proxy_proxy_duration_seconds"):
        assert value(node, f"{name}_count", direction="northbound") == REQUESTS
    total = value(node, "agent_proxy_request_duration_seconds_sum", direction="northbound")
    parts = sum(value(node, f"{n}_sum", direction="northbound") for n in ("agent_proxy_origin_duration_seconds", "agent_proxy_proxy_duration_seconds"))
    assert parts == pytest.approx(total, rel=1e-6)


def test_build_info_and_no_created_series(scraped):
    text = scraped[2]
    assert re.search(r'^agent_proxy_build_info\{python="[0-9.]+",version="[^"]+"\} 1\.0$', text, re.M)
    assert "_created" not in text


def test_every_exported_family_is_in_the_table_and_the_readme(scraped):
    exported = {s[0] for s in samples(scraped[2])}
    families = {f.name for f in FAMILIES}

    def family_of(sample: str) -> str:
        for suffix in ("_bucket", "_count", "_sum"):
            if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
                return sample.removesuffix(suffix)
        return sample

    assert {family_of(s) for s in exported} == families
    assert markdown_table() in (REPO / "README.md").read_text(), "README's metrics table differs from metrics.FAMILIES: paste markdown_table()"


def test_certificate_expiry_is_the_front_certificate_end_date(node, scraped):
    import datetime
    import subprocess

    end = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(node.cert)], capture_output=True, text=True, check=True)
    expected = datetime.datetime.strptime(end.stdout.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.timezone.utc)
    found = value(samples(scraped[2]), "agent_proxy_certificate_expiry_timestamp_seconds", certificate="front")
    assert found == expected.timestamp()
