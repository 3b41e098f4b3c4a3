"""Services: the workers and the node front run, as an unprivileged user, with a valid config.

With systemd as PID 1 the controls check the units (`agent-proxy@PORT.service`,
the front's unit, the appliance's `agent-proxy-front.service` or else Debian's
`haproxy.service`); on a host without it (a lab node in a network namespace) they check
the processes listening on the node's ports instead, and say so in the summary.
"""

from __future__ import annotations

import re
import shlex


def test_AP_SVC_01_worker_running(host, node, control, worker_port):
    if node.systemd:
        service = host.service(f"agent-proxy@{worker_port}.service")
        assert service.is_running, f"agent-proxy@{worker_port}.service is not running"
        assert service.is_enabled, f"agent-proxy@{worker_port}.service is not enabled (it would not start at boot)"
        control.note(f"agent-proxy@{worker_port}.service running and enabled")
    else:
        proc = node.worker(worker_port)
        assert proc is not None, f"no agent-proxy worker listens on port {worker_port}"
        control.note(f"{node.service_mode[1]}, checked by its processes: worker pid {proc.pid} listens on {worker_port}")


def test_AP_SVC_02_worker_unprivileged(node, control, worker_port):
    proc = node.worker(worker_port)
    assert proc is not None, f"no worker process found for port {worker_port}"
    assert proc.user not in ("root", "0"), f"the worker on {worker_port} (pid {proc.pid}) runs as root"
    control.note(f"pid {proc.pid} runs as {proc.user}")


def test_AP_SVC_03_front_running(host, node, control):
    if node.systemd:
        unit = node.front_unit
        service = host.service(unit)
        assert service.is_running, f"{unit} is not running"
        assert service.is_enabled, f"{unit} is not enabled (it would not start at boot)"
        control.note(f"{unit} running and enabled")
    else:
        port = node.config.front.port
        assert node.front_processes, f"no haproxy process listens on port {port}"
        control.note(f"{node.service_mode[1]}, checked by its processes: haproxy pid {node.front_processes[0].pid} listens on {port}")


def test_AP_SVC_04_front_config_valid(host, node, control):
    haproxy = host.find_command("haproxy")
    files = " ".join(f"-f {shlex.quote(f)}" for f in node.front_config_files)
    result = host.run(f"{haproxy} -c {files}")
    detail = (result.stderr or result.stdout).strip().splitlines()
    assert result.rc == 0, f"haproxy -c {files} failed: {detail[-1] if detail else result.rc}"
    control.note(f"haproxy -c {files}: valid")


def test_AP_SVC_05_front_runs_configured_mode(host, node, control):
    """The front's config relays northbound itself exactly when front.mode is native: a
    config changed without rendering the front again shows here."""
    mode = node.config.front.mode
    text = "".join(host.file(f).content_string for f in node.front_config_files)
    native = re.search(r"^\s*use_backend upstream\b", text, re.MULTILINE) is not None
    assert native == (mode == "native"), (
        f"front.mode is {mode} but {' '.join(node.front_config_files)} "
        f"{'relays northbound itself' if native else 'passes northbound to the workers'}")
    control.note(f"front.mode {mode}: {'HAProxy relays northbound' if native else 'the workers relay northbound'}")
