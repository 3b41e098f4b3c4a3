"""What `pip show agent-proxy` and an installed wheel tell a user: licence, readme, classifiers."""

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_licence_is_apache_2_in_full_and_travels_with_the_package():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a pointer to it
    dist = importlib.metadata.distribution("agent-proxy")
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    shipped = [f for f in dist.files if f.name == "LICENSE" and "licenses" in f.parts]
    assert len(shipped) == 1 and shipped[0].read_text() == text


def test_the_package_says_what_it_is_and_where_it_runs():
    meta = importlib.metadata.metadata("agent-proxy")
    assert meta["Description-Content-Type"] == "text/markdown" and "agent-proxy" in meta.get_payload()
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers and "Topic :: Internet :: Proxy Servers" in classifiers
