"""`make vagrant-demo`: the scenario (lab/scenario.py) on VMs brought up by the Vagrantfile.

    python -m lab.vagrant --workdir DIR [--hosts "upstream internet gateway-b node-b agent-b"]

Run by packer/vagrant-demo.sh, which starts libvirtd in a network namespace of its own
and runs this inside it (the VMs' management addresses exist only there). The steps:
`vagrant up --no-provision` of the chosen hosts (LAB_HOSTS, default all), `vagrant
provision` (ansible/playbooks/lab.yml), the scenario's steps with a host reached over SSH
(`vagrant ssh-config`, commands under sudo) instead of `ip netns exec`, and `vagrant
destroy`, by name, whatever happened. Steps that need a host not chosen are skipped.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from kit import REPO, wait_until

from . import scenario, topology
from .hosts import Hosts, LabError
from .topology import Topology

# Where the plays put things on a VM (ansible/playbooks/lab.yml and the appliance image).
AGENT_PROXY = "/opt/agent-proxy/bin/agent-proxy"
NODE_CONFIG = "/etc/agent-proxy/agent-proxy.yaml"
UPSTREAM_CA = "/etc/agent-proxy-lab/upstream.crt"
PYTHON = "/usr/bin/python3"
# A scenario service (lab/hosts.py names them) -> its systemd unit; agents and the upstream by role.
UNITS = {"front": "agent-proxy-front.service", "keepalived": "keepalived.service"}
ROLE_UNITS = {"agent": "agent-proxy-lab-agent.service", "upstream": "agent-proxy-lab-upstream.service"}
NODE_UNITS = ["agent-proxy-front.service", "agent-proxy@*.service"]
SHARED_SECRET = "/etc/agent-proxy/psk"
UP_TIMEOUT = 2400      # seconds for `vagrant up` of one VM (its boot timeout is 1800 s, the Vagrantfile)
PROVISION_TIMEOUT = 3600


class VagrantLab(Hosts):
    agents_timeout = 180
    control_apart = True   # lab.yml gives the nodes listen_control and the gateways the control port

    def __init__(self, workdir: Path | str, hosts: Sequence[str] = (), topology_file: Path | str = topology.TOPOLOGY_FILE):
        self.workdir = Path(workdir)
        self.topology: Topology = topology.load(Path(topology_file))
        unknown = [h for h in hosts if h not in self.topology.hosts]
        if unknown:
            raise LabError(f"LAB_HOSTS: not in lab/topology.yaml: {' '.join(unknown)}")
        self.chosen = list(hosts) or list(self.topology.hosts)
        self.ssh_config = self.workdir / "ssh-config"

    # -- the host access: SSH, with sudo

    def run(self, host: str, argv: Sequence[str], timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        ssh = ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", host]
        return subprocess.run(ssh + ["sudo " + shlex.join(argv)], capture_output=True, text=True, timeout=timeout, input=input)

    @property
    def hosts_up(self) -> set[str]:
        return set(self.chosen)

    def python(self, host: str) -> str:
        return PYTHON

    def agent_proxy(self, host: str) -> str:
        return AGENT_PROXY

    def node_config(self, host: str) -> str:
        return NODE_CONFIG

    @property
    def upstream_ca_file(self) -> str:
        return UPSTREAM_CA

    def site_secret(self, site_name: str) -> bytes:
        """The site's shared secret, as its first node holds it (the role gives every node the same)."""
        node = self.topology.sites[site_name].nodes[0]
        result = self.run(node, ["cat", SHARED_SECRET])
        if result.returncode != 0:
            raise LabError(f"cat {SHARED_SECRET} on {node}: {result.stderr.strip()}")
        return result.stdout.strip().encode()

    def _unit(self, service: str) -> tuple[str, str]:
        host, _, part = service.partition("/")
        return host, UNITS[part] if part else ROLE_UNITS[self.topology.hosts[host].role]

    def log_lines(self, service: str) -> list[str]:
        host, unit = self._unit(service)
        result = self.run(host, ["journalctl", "--unit", unit, "--output", "cat", "--no-pager"], timeout=60)
        if result.returncode != 0:
            raise LabError(f"journalctl --unit {unit} on {host}: {result.stderr.strip()}")
        return result.stdout.splitlines()

    def _systemctl(self, host: str, *args: str) -> None:
        result = self.run(host, ["systemctl", *args], timeout=120)
        if result.returncode != 0:
            raise LabError(f"systemctl {' '.join(args)} on {host}: {result.stderr.strip()}")

    def kill(self, service: str) -> str:
        host, unit = self._unit(service)
        self._systemctl(host, "kill", "--signal=KILL", unit)
        return f"unit {unit}"

    def stop_node(self, name: str) -> list[str]:
        # Killed outright, then stopped, so that systemd does not start them again.
        self._systemctl(name, "kill", "--signal=KILL", *NODE_UNITS)
        self._systemctl(name, "stop", "agent-proxy.target", *NODE_UNITS)
        return NODE_UNITS

    def start_agents(self) -> None:
        agents = [self.topology.hosts[a] for site in self.sites_up for a in site.agents]
        for agent in agents:
            self._systemctl(agent.name, "restart", ROLE_UNITS["agent"])
        for agent in agents:
            try:
                wait_until(lambda: self._listening(agent.name, agent.address, self.topology.agent_port), 60,
                           f"agent {agent.name} on {agent.address}:{self.topology.agent_port}", interval=1)
            except TimeoutError as exc:
                raise LabError(f"{exc}\n" + "\n".join(self.log_lines(agent.name)[-5:])) from None

    def _listening(self, host: str, address: str, port: int) -> bool:
        try:
            self.connect(host, address, port, 3)
            return True
        except OSError:
            return False

    # -- Vagrant

    def vagrant(self, args: Sequence[str], log: str, timeout: float) -> str:
        """A vagrant command on the chosen hosts, its output in the work directory; raises LabError with its end."""
        env = {**os.environ, "LAB_HOSTS": " ".join(self.chosen)}
        path = self.workdir / log
        with open(path, "w") as out:
            try:
                result = subprocess.run(["vagrant", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=timeout)
            except subprocess.TimeoutExpired:
                raise LabError(f"vagrant {' '.join(args)} took more than {timeout:g} s (log {path})") from None
        if result.returncode != 0:
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            raise LabError(f"vagrant {' '.join(args)} failed (exit {result.returncode}; log {path}):\n{tail}")
        return path.read_text(errors="replace")

    def up(self) -> str:
        # One VM at a time: under TCG on a small machine, VMs booting together starve each
        # other (5 at once on 2 cores: 3 of them not on SSH after 300 s, load 7-8).
        started = time.monotonic()
        took = []
        for host in self.chosen:
            begun = time.monotonic()
            self.vagrant(["up", "--no-provision", host], f"up-{host}.log", UP_TIMEOUT)
            took.append(f"{host} {time.monotonic() - begun:.0f} s")
        self.ssh_config.write_text(self.vagrant(["ssh-config", *self.chosen], "ssh-config.log", 120))
        return f"{len(self.chosen)} VMs up, one at a time, in {time.monotonic() - started:.0f} s: {', '.join(took)}"

    def provision(self) -> str:
        output = self.vagrant(["provision"], "provision.log", PROVISION_TIMEOUT)
        recap = [line for line in output.splitlines() if " : ok=" in line]
        failed = [line for line in recap if "failed=0" not in line or "unreachable=0" not in line]
        if failed or not recap:
            raise LabError("ansible-playbook lab.yml: " + ("\n".join(failed) or "no play recap (see provision.log)"))
        return "ansible/playbooks/lab.yml:\n" + "\n".join(line.strip() for line in recap)

    def destroy(self) -> str:
        self.vagrant(["destroy", "--force", *self.chosen], "destroy.log", 600)
        left = self.vagrant(["status", *self.chosen], "status.log", 120)
        running = [h for h in self.chosen for line in left.splitlines()
                   if line.split()[:1] == [h] and "not created" not in line]
        if running:
            raise LabError(f"still created after vagrant destroy: {' '.join(running)}")
        return f"vagrant destroy: {len(self.chosen)} VMs gone ({' '.join(self.chosen)})"


def run(lab: VagrantLab, say: Callable[[str], None] = print) -> bool:
    bring_up = [
        (f"vagrant up --no-provision ({len(lab.chosen)} of {len(lab.topology.hosts)} hosts)", lab.up),
        ("vagrant provision: a play per topology role (ansible/playbooks/lab.yml)", lab.provision),
    ]
    tear_down = ("tear down: vagrant destroy, no VM left", lab.destroy)
    header = (f"agent-proxy Vagrant lab: {len(lab.chosen)} of {len(lab.topology.hosts)} hosts "
              f"({' '.join(lab.chosen)}), work directory {lab.workdir}")
    return scenario.run(lab, header, bring_up, tear_down, say, logs=str(lab.workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.vagrant", description="The lab's scenario on Vagrant VMs.")
    parser.add_argument("--workdir", required=True, help="logs and the SSH configuration")
    parser.add_argument("--hosts", default=os.environ.get("LAB_HOSTS", ""),
                        help="the topology hosts to bring up, space-separated (default: LAB_HOSTS, else all)")
    args = parser.parse_args(argv)
    try:
        lab = VagrantLab(args.workdir, args.hosts.replace(",", " ").split())
    except (LabError, topology.TopologyError) as exc:
        print(f"vagrant-demo: {exc}", file=sys.stderr)
        return 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    return 0 if run(lab) else 1


if __name__ == "__main__":
    sys.exit(main())
