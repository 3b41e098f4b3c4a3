"""Operations: the clock is synchronised (signatures allow limits.auth_skew_seconds of
skew) and the workers' logs reach the journal. Both need systemd as PID 1."""

from __future__ import annotations

import pytest

TIME_SERVICES = ("systemd-timesyncd.service", "chrony.service", "chronyd.service", "ntpsec.service")


def require_systemd(node, what: str) -> None:
    if not node.systemd:
        pytest.skip(f"{what} not checked: {node.service_mode[1]}")


def test_AP_OPS_01_time_sync_active(host, node, control):
    require_systemd(node, "time sync")
    running = [name for name in TIME_SERVICES if host.service(name).is_running]
    assert running, f"no time synchronisation service runs (looked for {', '.join(TIME_SERVICES)})"
    control.note(f"{running[0]} running")


def test_AP_OPS_02_logs_in_journal(host, node, control, worker_port):
    require_systemd(node, "journal")
    unit = f"agent-proxy@{worker_port}.service"
    lines = host.check_output(f"journalctl -u {unit} -n 5 --no-pager -o cat -q").splitlines()
    assert lines, f"journalctl -u {unit} shows no lines"
    control.note(f"{len(lines)}+ lines, last: {lines[-1][:80]}")
