"""The test kit shared by tests/, lab/ and bench/ (never imported by app/).

    from kit import Process, wait_until, wait_for_port, free_port, write_config, start_worker
    from kit import netns                     # network namespaces by name

One process wrapper (kit.process), one bounded wait (kit.wait), one free-port helper
(kit.ports), one writer of secret files (kit.files), one worker-config builder (kit.config), one node builder: workers behind a
rendered HAProxy front (kit.node), and the clients tests use against a front (kit.clients).
"""

from . import netns
from .clients import LoadResult, dechunk, echo_via, headers_of, proxy_v2_header, run_load
from .config import AGENT_PROXY, PYTHON, REPO, SECRET, VENV_BIN, merged, write_config
from .files import write_private
from .node import (
    AGENT, BALANCER, HAPROXY, LIMITED_AGENT, MAX_CONN_PER_SOURCE, NGINX, NodeFront, all_up, node_with_origin, render,
    server_stats, start_haproxy, start_node, start_origin, start_upstream, start_worker, stat_rows, stats_command,
)
from .ports import free_port, free_ports
from .process import Process, ProcessError
from .wait import connects, wait_for_port, wait_until

__all__ = [
    "AGENT", "AGENT_PROXY", "BALANCER", "HAPROXY", "LIMITED_AGENT", "MAX_CONN_PER_SOURCE", "NGINX", "PYTHON", "REPO",
    "SECRET", "VENV_BIN", "LoadResult", "NodeFront", "Process", "ProcessError", "all_up", "connects",
    "dechunk", "echo_via", "free_port", "free_ports", "headers_of", "merged", "netns", "node_with_origin", "proxy_v2_header", "render",
    "run_load", "server_stats", "start_haproxy", "start_node", "start_origin", "start_upstream", "start_worker",
    "stat_rows", "stats_command", "wait_for_port", "wait_until", "write_config", "write_private",
]
