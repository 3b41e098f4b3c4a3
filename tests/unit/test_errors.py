"""The error catalogue: one table, the README's table is that table, and no import circle."""

import re
import subprocess
import sys

import pytest

from agent_proxy.errors import CATALOGUE, ProxyError
from kit import REPO


def readme_table(heading_marker: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading_marker`` in README.md, as cells."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading_marker):]
    rows, started = [], False
    for line in after.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif started:
            break
    return rows[2:]  # without the header and the --- line


def test_readme_error_table_is_the_catalogue():
    listed = [(re.sub(r"^`|`$", "", code), int(status), title, when) for code, status, title, when in readme_table("**Errors the proxy makes**")]
    assert listed == [(e.code, e.status, e.title, e.when) for e in CATALOGUE.values()]


def test_codes_are_lower_case_words_and_statuses_are_errors():
    for error in CATALOGUE.values():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", error.code)
        assert 400 <= error.status <= 599


def test_an_error_takes_status_and_title_from_the_catalogue():
    error = ProxyError("agent-timeout", "10.0.0.2:2003 did not answer within 60 s")
    assert (error.status, error.title) == (504, "Gateway timeout")


def test_a_code_outside_the_catalogue_cannot_be_raised():
    with pytest.raises(KeyError):
        ProxyError("made-up-code", "no such error")


def test_registration_does_not_import_the_command_line():
    # CommandError lives in errors.py: registration needs it, cli imports registration.
    probe = "import sys, agent_proxy.registration; print('agent_proxy.cli' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
