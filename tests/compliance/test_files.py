"""Files: the private key, the shared secret and (front.mode native) the front's signing
key are 0600 and owned by the service user or root; the config is not world-readable; nothing under the config and install folders is
world-writable."""

from __future__ import annotations

import posixpath
import shlex

import pytest

SECRETS = {"key": lambda c: c.tls.key_file, "secret": lambda c: c.shared_secret_file,
           "front-key": lambda c: c.shared_secret_file + ".haproxy-map"}


def secret_path(config, secret: str) -> str:
    """The file; the front's signing key only matters (and must exist) in front.mode native."""
    if secret == "front-key" and config.front.mode != "native":
        pytest.skip("front.mode is worker: the front signs nothing")
    return SECRETS[secret](config)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_AP_FILE_01_secret_mode_0600(host, node, control, secret):
    path = secret_path(node.config, secret)
    f = host.file(path)
    assert f.is_file, f"{path} does not exist"
    assert f.mode == 0o600, f"{path} has mode {f.mode:04o}, expected 0600"
    control.note(f"{path} 0600")


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_AP_FILE_02_secret_owner(host, node, control, secret):
    path = secret_path(node.config, secret)
    f = host.file(path)
    assert f.is_file, f"{path} does not exist"
    allowed = {"root"} | node.service_users
    assert f.user in allowed, f"{path} is owned by {f.user}; expected one of {', '.join(sorted(allowed))}"
    control.note(f"{path} owned by {f.user}")


def test_AP_FILE_03_config_not_world_readable(host, node, control):
    f = host.file(node.config_path)
    assert f.is_file, f"{node.config_path} does not exist on the host (set --ap-config)"
    assert f.mode & 0o007 == 0, f"{node.config_path} has mode {f.mode:04o}: others may read it"
    control.note(f"{node.config_path} {f.mode:04o}")


FOLDERS = {
    "config-dir": (lambda node: posixpath.dirname(node.config_path), "--ap-config"),
    "install-dir": (lambda node: node.install_dir, "--ap-install-dir"),
}


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_AP_FILE_04_nothing_world_writable(host, node, control, folder):
    where, option = FOLDERS[folder]
    path = where(node)
    if not host.file(path).is_directory:
        pytest.skip(f"{path} does not exist on this host (set {option})")
    found = host.check_output(f"find {shlex.quote(path)} -xdev -perm -0002 ! -type l").split()
    assert not found, f"world-writable under {path}: {', '.join(found[:5])}" + (" ..." if len(found) > 5 else "")
    control.note(f"none under {path}")
