"""Which settings need a restart is said once, on the config fields; the README's table
and the Ansible role's list must say the same."""

import re
from pathlib import Path

import yaml

from agent_proxy import config as configuration

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_lists_the_restart_keys_and_why():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### What a reload applies", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.+) \|$", section, re.MULTILINE)
    assert dict(rows) == configuration.restart_keys()
    assert len(rows) == len(configuration.restart_keys())


def test_ansible_role_restarts_on_the_same_keys():
    internals = yaml.safe_load((ROOT / "ansible/roles/agent_proxy/vars/main.yml").read_text())
    assert internals["__agent_proxy_restart_keys"] == list(configuration.restart_keys())


def test_restart_keys_are_real_settings():
    config = configuration.parse({"proxy_id": "a", "upstream": {"url": "https://x"}}, environ={})
    for key in configuration.restart_keys():
        config.get(key)  # raises AttributeError for a key that is not a setting
    assert "limits.threads" in configuration.restart_keys() and "logging.format" not in configuration.restart_keys()
