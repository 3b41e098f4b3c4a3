"""app/requirements.lock: the dependency set the Debian package installs with --require-hashes."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "app" / "requirements.lock"


def pins() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), from the lock's requirement entries (backslash-continued)."""
    text = LOCK.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"not an exact pin with sha256 hashes: {line[:80]}"
        found[canonicalize_name(match[1])] = (match[2], re.findall(r"[0-9a-f]{64}", match[3]))
    return found


def test_the_lock_counts_its_revisions_on_its_first_line():
    assert re.fullmatch(r"# lock-revision: [1-9][0-9]*", LOCK.read_text().splitlines()[0])


def test_every_locked_package_is_an_exact_version_with_hashes():
    locked = pins()
    assert locked, "the lock pins nothing"
    assert all(hashes for _, hashes in locked.values())


def test_the_lock_satisfies_every_runtime_dependency_of_the_app():
    locked = pins()
    project = tomllib.loads((ROOT / "app" / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is in app/pyproject.toml but not in the lock (make lock)"
        assert requirement.specifier.contains(locked[name][0]), \
            f"the lock pins {requirement.name} {locked[name][0]}, outside {requirement.specifier} (make lock)"
