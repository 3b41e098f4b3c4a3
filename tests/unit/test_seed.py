"""The boot seed (agent_proxy.seed): what first boot makes of seed.env on a node's files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent_proxy import config as configuration
from agent_proxy.seed import KEYS, HEADER, SeedError, apply, parse_env, validate

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "appliance" / "seed.env.example"
IMAGE_CONFIG = "# Written by Ansible (role agent_proxy)\nproxy_id: appliance\nupstream:\n  url: https://upstream.invalid:3302\nfront:\n  workers: 2\n"
CHRONY = "confdir /etc/chrony/conf.d\npool 2.debian.pool.ntp.org iburst\nsourcedir /etc/chrony/sources.d\n"


@pytest.fixture
def node(tmp_path):
    """A node's files as the image has them before first boot."""
    root = tmp_path / "root"
    (root / "etc/chrony").mkdir(parents=True)
    (root / "etc/chrony/chrony.conf").write_text(CHRONY)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 agent-proxy\n")
    config = root / "etc/agent-proxy/agent-proxy.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(IMAGE_CONFIG)
    fw_vars = root / "etc/agent-proxy/firewall/vars.yaml"
    fw_vars.parent.mkdir()
    fw_vars.write_text("admin_networks:\n- 10.0.0.0/8\nssh_port: 22\n")
    seed = tmp_path / "seed"
    seed.mkdir()
    return root, config, fw_vars, seed


def test_the_example_documents_every_key_and_is_valid(node):
    values = parse_env(EXAMPLE.read_text(), str(EXAMPLE))
    assert set(values) == set(KEYS)
    validate(values, str(EXAMPLE))
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_text(EXAMPLE.read_text())
    apply(seed, config, fw_vars, root)
    assert yaml.safe_load(config.read_text())["networks"] == {"agents": ["10.0.0.0/24"], "upstream": ["8.7.6.5/32"]}


def test_a_seed_sets_the_config_firewall_and_node_files(node):
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_text(
        "# a comment\nPROXY_ID=site-b\nUPSTREAM_URL=http://10.0.2.2:8080\nUPSTREAM_ALLOW_INSECURE=true\n"
        "AGENT_NETWORKS=10.0.2.2/32, 10.9.0.0/16\nFRONT_MODE=native\nADMIN_NETWORKS=10.0.2.2/32\nHOSTNAME=node-b1\n"
        "ADDRESS=10.0.2.15/24 fd00::15/64\nGATEWAY=10.0.2.2\nDNS=10.0.2.3\nNTP_SERVERS=10.0.2.2 ntp.example\n")
    (seed / "upstream-ca.pem").write_text("CA")
    lines = apply(seed, config, fw_vars, root)

    data = yaml.safe_load(config.read_text())
    assert config.read_text().startswith(HEADER)
    assert data["proxy_id"] == "site-b"
    assert data["upstream"] == {"url": "http://10.0.2.2:8080", "allow_insecure": True,
                                "ca_file": "/etc/agent-proxy/tls/upstream-ca.pem"}
    assert data["networks"]["agents"] == ["10.0.2.2/32", "10.9.0.0/16"]
    assert data["front"] == {"workers": 2, "mode": "native"}
    assert (root / "etc/agent-proxy/tls/upstream-ca.pem").read_text() == "CA"
    assert yaml.safe_load(fw_vars.read_text()) == {"admin_networks": ["10.0.2.2/32"], "ssh_port": 22}
    assert (root / "etc/hostname").read_text() == "node-b1\n"
    assert "127.0.1.1 node-b1" in (root / "etc/hosts").read_text()
    assert "agent-proxy" not in (root / "etc/hosts").read_text()
    network = (root / "etc/systemd/network/10-eth0.network").read_text()
    assert "Address=10.0.2.15/24\nAddress=fd00::15/64\nGateway=10.0.2.2\n" in network
    assert "DHCP=no" in network
    assert (root / "etc/resolv.conf").read_text() == "nameserver 10.0.2.3\n"
    assert (root / "etc/chrony/sources.d/agent-proxy.sources").read_text() == "server 10.0.2.2 iburst\nserver ntp.example iburst\n"
    chrony = (root / "etc/chrony/chrony.conf").read_text()
    assert "\npool " not in chrony and "# pool 2.debian.pool.ntp.org" in chrony
    assert any("upstream.allow_insecure" in line for line in lines)


def test_the_seeded_config_passes_the_config_checks(node):
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_text("UPSTREAM_URL=http://10.0.2.2:8080\nUPSTREAM_ALLOW_INSECURE=yes\nAGENT_NETWORKS=10.0.2.2/32\n")
    apply(seed, config, fw_vars, root)
    parsed = configuration.parse(yaml.safe_load(config.read_text()), str(config), environ={})
    assert parsed.upstream.allow_insecure and [str(n) for n in parsed.networks.agents] == ["10.0.2.2/32"]


def test_no_seed_leaves_the_settings_alone(node):
    root, config, fw_vars, seed = node
    apply(seed, config, fw_vars, root)
    assert yaml.safe_load(config.read_text()) == yaml.safe_load(IMAGE_CONFIG)
    assert not (root / "etc/hostname").exists()
    assert "pool 2.debian" in (root / "etc/chrony/chrony.conf").read_text()


@pytest.mark.parametrize("line, named", [
    ("UPSTREAM_ULR=https://x", "unknown key UPSTREAM_ULR"),
    ("AGENT_NETWORKS=10.0.0.0/24 10.0.0.300/32", "AGENT_NETWORKS: "),
    # The config keys go through the config's own parser: what it refuses, the seed refuses.
    ("AGENT_NETWORKS=10.0.0.1/24", "seed.env: AGENT_NETWORKS: is not a valid CIDR network: 10.0.0.1/24 has host bits set"),
    ("BALANCERS=4.3.2.1/8", "seed.env: BALANCERS: is not a valid CIDR network: 4.3.2.1/8 has host bits set"),
    ("UPSTREAM_URL=ftp://upstream", "seed.env: UPSTREAM_URL: must be an http:// or https:// URL with a host"),
    ("PROXY_ID=site a", "seed.env: PROXY_ID: must match"),
    ("FRONT_MODE=fast", "seed.env: FRONT_MODE: "),
    ("ADMIN_NETWORKS=192.168.10.1/24", "seed.env: ADMIN_NETWORKS: 192.168.10.1/24 has host bits set"),
    ("ADDRESS=10.0.2.15", "ADDRESS: '10.0.2.15' needs a prefix length"),
    ("UPSTREAM_ALLOW_INSECURE=maybe", "UPSTREAM_ALLOW_INSECURE: must be true or false"),
    ("HOSTNAME=bad_name", "HOSTNAME: "),
    ("just words", "expected KEY=value"),
])
def test_a_bad_seed_is_refused_naming_the_key(node, line, named):
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_text(line + "\n")
    before = config.read_text()
    fw_before = fw_vars.read_text()
    with pytest.raises(SeedError) as caught:
        apply(seed, config, fw_vars, root)
    assert named in str(caught.value)
    assert config.read_text() == before and fw_vars.read_text() == fw_before


def test_the_command_says_one_line_and_exits_2(node):
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_text("DNS=not-an-address\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent_proxy.seed", "--seed-dir", str(seed), "--config", str(config),
         "--firewall-vars", str(fw_vars), "--root", str(root)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{seed / 'seed.env'}: DNS: 'not-an-address' does not appear to be an IPv4 or IPv6 address"]
    assert "Traceback" not in done.stderr


def test_a_seed_that_is_not_utf8_is_one_line_and_one_with_a_byte_order_mark_is_read(node):
    root, config, fw_vars, seed = node
    (seed / "seed.env").write_bytes(b"PROXY_ID=site-a\nHOSTNAMES=caf\xe9\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent_proxy.seed", "--seed-dir", str(seed), "--config", str(config),
         "--firewall-vars", str(fw_vars), "--root", str(root)],
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"{seed / 'seed.env'}: not UTF-8 text (byte 0xe9 at offset 29)"])
    # A byte-order mark (some editors write one) is not part of the first key.
    (seed / "seed.env").write_bytes("\ufeffPROXY_ID=site-bom\n".encode())
    apply(seed, config, fw_vars, root)
    assert yaml.safe_load(config.read_text())["proxy_id"] == "site-bom"


def seed_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_proxy.seed", *args], capture_output=True, text=True, timeout=60)


def test_first_boot_reads_the_seed_through_the_one_parser(node):
    root, config, fw_vars, seed = node
    # Quoting and spacing as seed.env.example allows; the values first boot acts on.
    (seed / "seed.env").write_text(
        "HOSTNAME = 'node-c1'\nPUBLIC_URL=\"https://4.3.2.1:2002\"\nHOSTNAMES=proxy.example.net, 4.3.2.1\n"
        "HOSTNAME=node-c2\n")
    done = seed_command("--seed-dir", str(seed), "--get", "HOSTNAME", "ADDRESS", "PUBLIC_URL", "HOSTNAMES")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "node-c2\n\nhttps://4.3.2.1:2002\nproxy.example.net 4.3.2.1\n"
    refused = seed_command("--seed-dir", str(seed), "--get", "HOSTNAM")
    assert refused.returncode == 2 and refused.stderr.startswith("--get: unknown key HOSTNAM (known: PROXY_ID, ")


def test_first_boot_reads_the_configuration_through_the_config_loader(node):
    root, config, fw_vars, seed = node
    done = seed_command("--config", str(config), "--get-config",
                        "proxy_id", "upstream.url", "tls.cert_file", "tls.key_file", "shared_secret_file")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["appliance", "https://upstream.invalid:3302", "/etc/agent-proxy/tls/proxy.crt",
                                        "/etc/agent-proxy/tls/proxy.key", "/etc/agent-proxy/psk"]
    refused = seed_command("--config", str(config), "--get-config", "tls.crt_file")
    assert (refused.returncode, refused.stderr) == (2, "--get-config: tls.crt_file is not a configuration key\n")
