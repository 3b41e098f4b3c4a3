"""The alerting rules shipped in monitoring/: valid for Prometheus, and each alert fires
when it should and not otherwise (promtool's own rule tests, Debian package prometheus)."""

from __future__ import annotations

import shutil
import subprocess

from kit import REPO

MONITORING = REPO / "monitoring"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make deps` installs it (Debian package prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=MONITORING)


def test_rules_pass_promtool_check():
    done = promtool("check", "rules", "agent-proxy.rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_rules_pass_their_promtool_unit_tests():
    done = promtool("test", "rules", "agent-proxy.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test():
    import yaml

    rules = yaml.safe_load((MONITORING / "agent-proxy.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "agent-proxy.rules.test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert alerts == tested, f"alerts never shown firing in a test: {sorted(alerts - tested)}"
