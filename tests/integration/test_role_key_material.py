"""The agent_proxy role's key material (tasks/keys.yml), through real ansible-playbook runs.

Three hosts of one proxy_id, each a folder on this machine (a local connection; the
role's paths point into the folders): the material is made once, on the first host, and
every host ends up with the same; a host holding other material fails the play and keeps
it, unless agent_proxy_replace_key_material; material given in variables is checked by
`agent-proxy init` and installed; nothing is ever logged; a second run changes nothing.
The same role runs against booted VMs in packer/test-multinode.sh.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kit import AGENT_PROXY, REPO, VENV_BIN

ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"
HOSTS = ["node1", "node2", "node3"]

pytestmark = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not in .venv: run ansible/lint.sh")

# main.yml looks at the files before it imports keys.yml; this play does the same.
PLAY = """
- name: Key material of the agent_proxy role
  hosts: proxies
  gather_facts: false
  serial: "{{ batch | default(1) }}"
  tasks:
    - name: Look for the certificate, its key and the shared secret
      ansible.builtin.stat:
        path: "{{ item }}"
        checksum_algorithm: sha1
      loop: ["{{ agent_proxy_config.tls.cert_file }}", "{{ agent_proxy_config.tls.key_file }}",
             "{{ agent_proxy_config.shared_secret_file }}"]
      register: __agent_proxy_key_material
    - name: Key material
      ansible.builtin.include_role:
        name: agent_proxy
        tasks_from: keys.yml
"""


@pytest.fixture
def site(tmp_path):
    hosts = {}
    for host in HOSTS:
        (tmp_path / host / "tls").mkdir(parents=True)
        hosts[host] = {"agent_proxy_config": {
            "proxy_id": "site-a", "public_url": "https://lb.site-a.example:2002",
            "upstream": {"url": "https://8.7.6.5:3302"},
            "tls": {"cert_file": str(tmp_path / host / "tls" / "proxy.crt"), "key_file": str(tmp_path / host / "tls" / "proxy.key")},
            "shared_secret_file": str(tmp_path / host / "psk"),
        }}
    inventory = {"all": {"children": {"proxies": {"hosts": hosts, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": str(VENV_BIN / "python"),
        # No service is touched: the handlers skip with agent_proxy_init_at_first_boot.
        "agent_proxy_workers": 1, "agent_proxy_init_at_first_boot": True,
    }}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(PLAY)
    return tmp_path


def play(site: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(site / "ansible-home"), "ANSIBLE_LOCALHOST_WARNING": "False"}
    # The role's OS internals (vars/main.yml; only extra vars outrank them), pointed at this
    # machine: the repository's agent-proxy, and the files stay root's.
    internals = json.dumps({"__agent_proxy_bin": AGENT_PROXY, "__agent_proxy_user": "root"})
    return subprocess.run([str(ANSIBLE_PLAYBOOK), "-v", "-i", str(site / "hosts.yml"), str(site / "play.yml"),
                           "-e", internals, *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=site)


def recap(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
            for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", result.stdout, re.M)}


def material(site: Path, host: str) -> dict[str, bytes]:
    return {name: (site / host / path).read_bytes() for name, path in
            (("cert", "tls/proxy.crt"), ("key", "tls/proxy.key"), ("secret", "psk"))}


def assert_not_logged(result: subprocess.CompletedProcess, *values: bytes) -> None:
    for value in values:
        for line in value.decode().strip().splitlines():
            if "-----" not in line:
                assert line not in result.stdout + result.stderr, "key material in the playbook's output"


def test_made_once_on_the_first_host_and_the_same_on_every_host(site):
    first = play(site, "--diff")  # no task that carries the material shows a diff
    assert first.returncode == 0, first.stdout[-3000:]
    made = material(site, "node1")
    assert all(material(site, host) == made for host in HOSTS)
    assert_not_logged(first, made["secret"], made["key"])
    for path, mode in (("psk", 0o600), ("tls/proxy.key", 0o600), ("tls/proxy.crt", 0o644)):
        assert all((site / host / path).stat().st_mode & 0o777 == mode for host in HOSTS), path
    # Named after public_url's host: one certificate serves every node behind the balancer.
    cert = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(site / "node1/tls/proxy.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:lb.site-a.example" in cert
    second = play(site)
    assert second.returncode == 0 and all(c["changed"] == 0 for c in recap(second).values()), second.stdout[-3000:]
    assert material(site, "node3") == made


def test_other_material_on_a_host_is_reported_and_replaced_only_when_asked(site):
    assert play(site, "-e", "batch=3").returncode == 0
    group = material(site, "node1")
    (site / "node3" / "psk").write_text("node3-made-its-own-secret-0123456789abcdef\n")
    refused = play(site)
    assert refused.returncode != 0
    assert ("node3 holds another secret than the other nodes of proxy_id site-a (their material comes from node1). "
            "Every node of a proxy needs the same; nothing was replaced.") in refused.stdout
    assert recap(refused)["node3"]["failed"] == 1 and recap(refused)["node2"]["failed"] == 0
    assert (site / "node3" / "psk").read_text() == "node3-made-its-own-secret-0123456789abcdef\n"
    replaced = play(site, "--diff", "-e", "agent_proxy_replace_key_material=true")
    assert replaced.returncode == 0, replaced.stdout[-3000:]
    assert material(site, "node3") == group
    assert_not_logged(replaced, group["secret"], group["key"], b"node3-made-its-own-secret-0123456789abcdef")


def given_vars(site: Path, source: Path, key: Path | None = None) -> Path:
    path = site / "vault.yml"
    path.write_text(yaml.safe_dump({
        "agent_proxy_shared_secret": (source / "psk").read_text(),
        "agent_proxy_tls_cert": (source / "tls/proxy.crt").read_text(),
        "agent_proxy_tls_key": (key or source / "tls/proxy.key").read_text(),
    }))
    return path


def test_material_from_the_variables_is_checked_then_installed_everywhere(site):
    source, other = site / "given", site / "other"
    for folder in (source, other):
        done = subprocess.run([AGENT_PROXY, "init", "--config-dir", str(folder), "--upstream-url", "https://x:1",
                               "--hostname", "lb.site-a.example"], capture_output=True, timeout=60)
        assert done.returncode == 0
    wrong = play(site, "-e", f"@{given_vars(site, source, key=other / 'tls/proxy.key')}", "-e", "batch=3")
    assert wrong.returncode != 0 and "the key does not belong to the certificate" in wrong.stdout
    assert not any((site / host / "psk").exists() for host in HOSTS)

    given = given_vars(site, source)
    done = play(site, "-e", f"@{given}")
    assert done.returncode == 0, done.stdout[-3000:]
    assert all(material(site, host) == material(site, "given") for host in HOSTS)
    assert_not_logged(done, (source / "psk").read_bytes(), (source / "tls/proxy.key").read_bytes())
    again = play(site, "-e", f"@{given}")
    assert again.returncode == 0 and all(c["changed"] == 0 for c in recap(again).values())
