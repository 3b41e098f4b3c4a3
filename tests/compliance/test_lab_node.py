"""The compliance suite against a lab node: a correct node passes every control that
applies to it; a node broken on purpose fails exactly the controls that match the damage.

The suite runs as its operators run it (`pytest tests/compliance --hosts=local://`), as a
subprocess inside the node's network namespace, so it sees the node's ports and firewall.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from kit import REPO
from tests.compliance.labnode import LabNode

pytestmark = pytest.mark.netns

# What does not apply to a namespace node: no boot, no systemd of its own.
NOT_APPLICABLE = {("AP-FW-04", "-"), ("AP-OPS-01", "-"), ("AP-OPS-02", "8002"), ("AP-OPS-02", "8003")}


def controls(junit):
    """(properties, test case) of each control in the suite's JUnit XML."""
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "control" in props:
            yield props, case


def durations(junit) -> dict[str, float]:
    """control -> seconds its test case took."""
    return {props["control"]: float(case.get("time")) for props, case in controls(junit)}


def outcomes(junit) -> dict[tuple[str, str], str]:
    """(control, instance) -> passed, warned, failed or skipped."""
    found = {}
    for props, case in controls(junit):
        status = "warned" if "warn" in props else "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None:
            status = "skipped"
        found[(props["control"], props["instance"])] = status
    return found


def with_status(results: dict, status: str) -> set:
    return {key for key, value in results.items() if value == status}


@pytest.fixture(scope="module")
def lab_node():
    node = LabNode()
    try:
        yield node.up()
    finally:
        node.down()


def test_a_correct_node_passes(lab_node):
    run, junit = lab_node.audit("clean")
    results = outcomes(junit)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert with_status(results, "failed") == set()
    assert with_status(results, "skipped") == NOT_APPLICABLE
    assert len(with_status(results, "passed")) >= 30, sorted(results)
    assert "a lab node: network namespace" in run.stdout, "the summary must say how services were checked"


def test_a_broken_node_fails_exactly_the_matching_controls(lab_node):
    lab_node.renew_certificate(days=10)
    lab_node.loosen_key()
    lab_node.open_firewall()
    lab_node.render_front_as_worker_mode()
    lab_node.restart_workers_without_control_listener()
    lab_node.enable_tls10()  # restarts the front, which then serves the new certificate and mode
    run, junit = lab_node.audit("broken")
    results = outcomes(junit)
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-2000:]
    assert with_status(results, "failed") == {
        ("AP-FILE-01", "key"),   # key 0644
        ("AP-SVC-05", "-"),      # the front runs worker mode, the config says native
        ("AP-FW-01", "-"),       # INPUT policy ACCEPT
        ("AP-FW-02", "-"),       # :2002 open to anyone
        ("AP-FW-05", "-"),       # front.control_port open to anyone
        ("AP-EP-05", "-"),       # the client port serves the upstream's paths (403 to a stranger, not 404)
        ("AP-EP-03", "8002"),    # no control listener to ask for the features
        ("AP-EP-03", "8003"),
        ("AP-TLS-01", "-"),      # TLS 1.0 served
        ("AP-TLS-02", "-"),      # ssl-min-ver TLSv1.0 serves 1.1 as well
    }, run.stdout[-4000:]
    assert with_status(results, "skipped") == NOT_APPLICABLE
    assert with_status(results, "warned") == {("AP-TLS-06", "-")}  # expires in 10 days
    assert "AP-TLS-06" in next(line for line in run.stdout.splitlines() if " WARN " in line)


def test_a_front_that_stops_answering_fails_its_probes_within_the_probe_timeout(lab_node):
    # Stopped (HAProxy's master and worker: the process group), the front's listening socket
    # still accepts: every probe connects, then waits.
    os.killpg(lab_node.front.pid, signal.SIGSTOP)
    try:
        run, junit = lab_node.audit("frozen", "--ap-probe-timeout=2", "-k", "TLS_03 or TLS_07 or EP_04")
    finally:
        os.killpg(lab_node.front.pid, signal.SIGCONT)
    results = outcomes(junit)
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-2000:]
    assert with_status(results, "failed") == {("AP-TLS-03", "-"), ("AP-TLS-07", "-"), ("AP-EP-04", "-")}, results
    assert "no TLS 1.2 handshake with the front" in run.stdout
    assert "no certificate from the front at" in run.stdout
    # Each gave up after its 2 s, not the default 10 s.
    assert all(seconds < 10 for seconds in durations(junit).values()), durations(junit)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "86400"])
def test_a_probe_timeout_that_is_not_seconds_is_a_one_line_usage_error(value):
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/compliance", "--hosts=local://",
                          f"--ap-probe-timeout={value}", "-p", "no:cacheprovider", "-q"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 4, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: argument --ap-probe-timeout: {value!r} is not a number of seconds from 0 to 3600"), run.stderr
    assert "Traceback" not in run.stdout + run.stderr
