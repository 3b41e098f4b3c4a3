"""python -m lab up|down|demo|status  (see lab/README.md)."""

from __future__ import annotations

import argparse
import sys

from . import demo
from .runner import DEFAULT_PREFIX, DEFAULT_WORKDIR, Lab, LabError


def how_to_use(lab: Lab) -> str:
    topo = lab.topology
    site_a = topo.sites["site-a"]
    node1 = lab.nodes[site_a.nodes[0]]
    up = topo.upstream_host
    cacert = lab.host_dir(up) / "upstream.crt"
    where = "" if lab.workdir == DEFAULT_WORKDIR else f" --workdir {lab.workdir}"
    return f"""
The lab is up ({len(lab.namespaces)} namespaces, {len(lab.processes)} processes; state in {lab.state_path}).

Enter a namespace:          ip netns exec {node1.namespace} bash
A node's config and files:  {node1.directory}/  (agent-proxy.yaml, haproxy.cfg, firewall.rules)
Logs:                       {lab.workdir}/logs/
The operator API (from the upstream's own namespace):
  ip netns exec {lab.ns(up)} curl -s --cacert {cacert} https://127.0.0.1:{topo.upstream_port}/operator/v1/agents
  ip netns exec {lab.ns(up)} curl -s --cacert {cacert} https://127.0.0.1:{topo.upstream_port}/operator/v1/commands \\
      -H 'Content-Type: application/json' -d '{{"proxy_id": "site-a", "agent_ip": "10.0.0.2", "command": "report"}}'
A node's health through its front:
  ip netns exec {node1.namespace} curl -sk https://{node1.address}:{node1.front_port}/_proxy/health
The gateway's rules:        ip netns exec {lab.ns(site_a.gateway)} iptables-save
Status:                     python -m lab status{where}      Tear down: python -m lab down{where}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description="The agent-proxy network-namespace lab.")
    parser.add_argument("command", choices=["up", "down", "demo", "status"])
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="where the lab keeps its files and state (default %(default)s)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return 0 if demo.run(Lab(args.workdir, args.prefix)) else 1
        if args.command == "up":
            lab = Lab(args.workdir, args.prefix)
            print(f"building the lab in {args.workdir} ...", flush=True)
            lab.up()
            print(how_to_use(lab))
            return 0
        lab = Lab.from_state(args.workdir)
        if args.command == "status":
            print("\n".join(lab.status()))
            return 0
        problems = lab.down()
        for line in problems:
            print(f"lab: {line}", file=sys.stderr)
        print("lab: down" if not problems else "lab: down, with the problems above")
        return 1 if problems else 0
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
