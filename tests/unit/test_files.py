"""agent_proxy.files: a file replaced in one rename, its mode and owner set before its bytes."""

from __future__ import annotations

import os

import pytest

from agent_proxy import files


def test_a_replaced_file_is_a_new_file_with_the_mode_whatever_the_umask(tmp_path):
    path = tmp_path / "vars.yaml"
    path.write_text("old\n")
    with open(path) as reader:  # a reader of the old file keeps reading the old file
        old_mask = os.umask(0o077)
        try:
            files.replace(path, "new\n", 0o644)
        finally:
            os.umask(old_mask)
        assert reader.read() == "old\n"
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o7777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vars.yaml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_the_owner_is_set(tmp_path):
    path = tmp_path / "psk"
    files.replace(path, b"secret", 0o600, owner=(1, 1))
    assert (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o7777) == (1, 1, 0o600)
    assert files.keep_owner_and_mode(path, 0o644) == (0o600, (1, 1))


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "a-directory"
    path.mkdir()
    with pytest.raises(IsADirectoryError):
        files.replace(path, "text", 0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]
