"""The compliance suite's options, fixtures and one-page summary.

    pytest tests/compliance --hosts=local://
    pytest tests/compliance --hosts=ssh://node --ssh-config=FILE --sudo
    pytest tests/compliance --hosts=ansible://proxies --ansible-inventory=FILE --sudo

Each test is one control, named after its id (``test_AP_TLS_01_...`` is AP-TLS-01).
Expected values are read from the node's own config through the testinfra host
(``--ap-config``). At the end a summary lists control, host, instance, PASS, FAIL, WARN
or SKIP and why; it is also written to ``--ap-summary`` (default
out/compliance-summary.txt). JUnit XML (``--junitxml``) carries the control id as a
property of each test case.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import pytest
import testinfra

from tests.compliance.node import Node

CONTROL_RE = re.compile(r"^test_(AP_[A-Z]+_\d+)_")
ROWS = pytest.StashKey[dict]()


class ComplianceWarning(UserWarning):
    """A control that passes but needs attention soon (e.g. a certificate about to expire)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agent-proxy compliance")
    group.addoption("--ap-config", default="/etc/agent-proxy/agent-proxy.yaml",
                    help="the node's agent-proxy config, read on the audited host (default: %(default)s)")
    group.addoption("--ap-front-config", default=None,
                    help="the node front's HAProxy config on the host (default: the running HAProxy's -f, "
                         "else /etc/haproxy/haproxy.cfg)")
    group.addoption("--ap-install-dir", default="/opt/agent-proxy",
                    help="where the program is installed on the host (default: %(default)s)")
    group.addoption("--ap-summary", default="out/compliance-summary.txt",
                    help="where to write the one-page summary (default: %(default)s)")
    group.addoption("--ap-probe-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                    help="how long one TLS or HTTP probe run on the host may take before it counts "
                         "as no answer (default: %(default)s; raise it for a slow host, e.g. an "
                         "emulated VM on a busy machine)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return value


def control_id(function_name: str) -> str | None:
    match = CONTROL_RE.match(function_name)
    return match.group(1).replace("_", "-") if match else None


def _hosts(config: pytest.Config) -> list:
    """The same Host objects testinfra's own plugin parametrises (testinfra caches them)."""
    option = config.option
    hosts = option.hosts.split(",") if option.hosts else [None]
    return testinfra.get_hosts(
        hosts, connection=option.connection, ssh_config=option.ssh_config,
        ssh_identity_file=option.ssh_identity_file, sudo=option.sudo, sudo_user=option.sudo_user,
        ansible_inventory=option.ansible_inventory, force_ansible=option.force_ansible,
    )


_nodes: dict[int, Node] = {}


def node_for(config: pytest.Config, host) -> Node:
    if id(host) not in _nodes:
        _nodes[id(host)] = Node(host, config.getoption("--ap-config"), config.getoption("--ap-front-config"),
                                config.getoption("--ap-install-dir"), config.getoption("--ap-probe-timeout"))
    return _nodes[id(host)]


@pytest.fixture(scope="module")
def node(host, request) -> Node:
    return node_for(request.config, host)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """worker_port: one instance per worker port of each host, read from that host's config."""
    if "worker_port" not in metafunc.fixturenames:
        return
    params = []
    for host in _hosts(metafunc.config):
        host_id = host.backend.get_pytest_id()
        try:
            ports = node_for(metafunc.config, host).worker_ports
        except Exception as exc:  # reported by the fixture, per test, instead of a collection error
            params.append(pytest.param((host_id, None, f"cannot read the worker ports: {exc}"), id="unknown"))
            continue
        params.extend(pytest.param((host_id, port, None), id=str(port)) for port in ports)
    metafunc.parametrize("worker_port", params, indirect=True, scope="function")


@pytest.fixture
def worker_port(request) -> int:
    _, port, problem = request.param
    if port is None:
        pytest.fail(problem)
    return port


class Control:
    """Lets a control say how it was checked (note) or that it passed with a warning (warn)."""

    def __init__(self, item: pytest.Item):
        self.item = item

    def note(self, text: str) -> None:
        self.item.user_properties.append(("note", text))

    def warn(self, text: str) -> None:
        self.item.user_properties.append(("warn", text))
        warnings.warn(ComplianceWarning(text), stacklevel=2)


@pytest.fixture
def control(request) -> Control:
    return Control(request.node)


def _host_id(item: pytest.Item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    host = params.get("_testinfra_host")
    return host.backend.get_pytest_id() if host is not None else "-"


def _instance(item: pytest.Item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    parts = []
    for name, value in params.items():
        if name == "_testinfra_host":
            continue
        if name == "worker_port":
            value = "?" if value[1] is None else value[1]
        parts.append(str(value))
    return ",".join(parts) or "-"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag each control; drop host/instance pairs that belong to another host; keep the
    lab-node test out of an audit run (--hosts) and the controls out of a run without it."""
    keep, drop = [], []
    for item in items:
        cid = control_id(getattr(item, "originalname", item.name))
        if cid is None:
            if config.option.hosts and Path(str(item.fspath)).name == "test_lab_node.py":
                drop.append(item)
            else:
                keep.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "worker_port" in params and params["worker_port"][0] != _host_id(item):
            drop.append(item)
            continue
        if not config.option.hosts:
            item.add_marker(pytest.mark.skip(reason="compliance controls need --hosts (e.g. --hosts=local://)"))
        item.user_properties += [("control", cid), ("instance", _instance(item))]
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    cid = control_id(getattr(item, "originalname", item.name))
    if cid is None:
        return
    rows = item.config.stash[ROWS]
    row = rows.setdefault(item.nodeid, {"control": cid, "host": _host_id(item), "instance": _instance(item),
                                        "status": "PASS", "why": ""})
    if report.failed:
        row["status"], row["why"] = "FAIL", _failure_reason(report)
    elif report.skipped and row["status"] != "FAIL":
        row["status"], row["why"] = "SKIP", _skip_reason(report)
    elif report.when == "call" and report.passed:
        props = dict(item.user_properties)
        if "warn" in props:
            row["status"], row["why"] = "WARN", props["warn"]
        else:
            row["why"] = props.get("note", "")


def _failure_reason(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    first = re.sub(r"^(AssertionError|Failed): ", "", first)
    return ("error in setup: " if report.when != "call" else "") + first


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return re.sub(r"^Skipped: ", "", report.longrepr[2])
    return str(report.longrepr)


def summary_lines(rows: list[dict]) -> list[str]:
    widths = {k: max([len(k)] + [len(r[k]) for r in rows]) for k in ("control", "host", "instance", "status")}
    header = {"control": "control", "host": "host", "instance": "instance", "status": "status", "why": "why"}
    lines = []
    for row in [header] + rows:
        lines.append("  ".join(row[k].ljust(widths[k]) for k in widths) + "  " + row["why"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "WARN", "SKIP")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = list(config.stash[ROWS].values())
    if not rows:
        return
    lines = summary_lines(rows)
    terminalreporter.section("agent-proxy compliance summary")
    for line in lines:
        terminalreporter.write_line(line)
    path = Path(config.getoption("--ap-summary"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    terminalreporter.write_line(f"summary written to {path}")
