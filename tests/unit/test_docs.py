"""docs/operator.md, as an operator follows it: every config key it names exists, every
option of the reference agent it shows exists, and the README links to it."""

import re
import subprocess
from pathlib import Path

from agent_proxy import config as configuration
from kit import AGENT_PROXY

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "operator.md").read_text()


def test_every_config_key_the_page_names_is_a_setting():
    settings = configuration.parse({"proxy_id": "a", "upstream": {"url": "https://x"}}, environ={}).effective()["settings"]
    named = set(re.findall(r"`((?:networks|agents|tls|upstream|limits|front|logging)\.[a-z_]+|shared_secret_file|proxy_id)`", PAGE))
    assert named and named <= set(settings), named - set(settings)


def test_the_reference_agent_takes_the_options_the_page_shows():
    shown = re.search(r"python -m agent_proxy.reference.agent (.*?)\n```", PAGE, re.S).group(1)
    options = set(re.findall(r"(--[a-z-]+)", shown))
    python = str(Path(AGENT_PROXY).with_name("python"))
    usage = subprocess.run([python, "-m", "agent_proxy.reference.agent", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert options and all(option in usage for option in options), options


def test_the_readme_links_the_page():
    assert "(docs/operator.md)" in (ROOT / "README.md").read_text()
