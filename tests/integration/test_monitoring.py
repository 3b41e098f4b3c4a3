"""Every metric the dashboard and the alerting rules in monitoring/ ask for exists: each
name is looked up in what a real node (two workers behind its HAProxy front) and a real
balancer (haproxy/lb-haproxy.cfg.j2, HAProxy's exporter) export."""

from __future__ import annotations

import json
import re

import pytest
import urllib3
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kit import (
    AGENT, REPO, free_port, node_with_origin, render, start_haproxy, wait_for_port, wait_until, write_config,
)

MONITORING = REPO / "monitoring"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                    # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                              # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                             # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)                                  # Grafana variables
    expr = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", expr)         # Grafana: label_values(metric, label)
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-agent-proxy.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load((MONITORING / "agent-proxy.rules.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def exported_names(*texts: str) -> set[str]:
    return {s.name for text in texts for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    with node_with_origin(tmp_path_factory, balancers=["127.0.0.1/32"]) as node:
        yield exported_names(*scrape(node, tmp_path_factory.mktemp("balancer")))


def scrape(node, directory) -> tuple[str, str]:
    """The node's /_proxy/metrics, and that of a real balancer in front of it."""
    balancer = None
    try:
        port, monitor_port = free_port(), free_port()
        config = write_config(directory, "http://127.0.0.1:9", front={"bind": "127.0.0.1", "port": port, "stats_socket": str(directory / "haproxy.sock")})
        (directory / "nodes.yaml").write_text(yaml.safe_dump({"nodes": [{"name": "node1", "address": "127.0.0.1", "port": node.port}]}))
        balancer = start_haproxy(render("lb-haproxy", config, str(directory / "nodes.yaml"), f"monitor_port={monitor_port}", "log_format=raw"),
                                 directory, "balancer")
        wait_for_port("127.0.0.1", monitor_port, proc=balancer)
        # From an agent's address: 127.0.0.1 is the balancer, which must send a PROXY header.
        http = urllib3.PoolManager(retries=False, ca_certs=str(node.cert), timeout=10, source_address=(AGENT, 0))
        # One request each way that can fail, so that every labelled series has a sample.
        assert http.request("GET", f"{node.url}/echo").status == 200
        lb_metrics = f"http://127.0.0.1:{monitor_port}/metrics"
        wait_until(lambda: 'haproxy_server_status{proxy="nodes",server="node1",state="UP"} 1' in http.request("GET", lb_metrics).data.decode(),
                   10, "node1 UP in the balancer's exporter")
        return http.request("GET", f"{node.url}/_proxy/metrics").data.decode(), http.request("GET", lb_metrics).data.decode()
    finally:
        if balancer is not None:
            balancer.stop()


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_reads_metrics_that_a_real_node_or_balancer_exports(exported, source):
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        missing = {n for n in names if n not in exported and f"{n}_bucket" not in exported}
        assert not missing, f"{source}: {query!r} reads {sorted(missing)}, which nothing exports"


def test_the_name_extraction_sees_metric_names_only():
    assert metric_names('sum by (instance) (rate(agent_proxy_requests_total{code=~"5.."}[5m])) / max(up) > 0.05') == {
        "agent_proxy_requests_total", "up"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[$__rate_interval])))") == {"x_bucket"}
    assert metric_names("label_values(agent_proxy_build_info, instance)") == {"agent_proxy_build_info"}
