"""The command line as an operator meets it: real subprocesses, exit codes, one-line errors."""

import os
import stat
import subprocess

import pytest
import yaml

from kit import AGENT_PROXY


def run(*args, env=None):
    return subprocess.run([AGENT_PROXY, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argument", ["version", "--version"])
def test_version(argument):
    result = run(argument)
    assert result.returncode == 0 and result.stdout.startswith("agent-proxy ") and result.stderr == ""


def test_init_writes_config_certificate_key_and_secret(tmp_path):
    result = run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a",
                 "--upstream-url", "https://8.7.6.5:3302", "--hostname", "10.1.2.3", "--hostname", "proxy.lan")
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "psk").read_text().strip()
    assert f"shared secret: {secret}" in result.stdout and "BEGIN CERTIFICATE" in result.stdout
    assert stat.S_IMODE((tmp_path / "psk").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "proxy.key").stat().st_mode) == 0o600
    config = yaml.safe_load((tmp_path / "agent-proxy.yaml").read_text())
    assert config["proxy_id"] == "site-a" and config["upstream"]["url"] == "https://8.7.6.5:3302"
    assert config["public_url"] == "https://10.1.2.3:2002"
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls" / "proxy.crt")],
                         capture_output=True, text=True, check=True).stdout
    assert "IP Address:10.1.2.3" in san and "DNS:proxy.lan" in san
    check = run("check-config", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert check.returncode == 0, check.stderr


def test_init_with_plain_http_upstream_writes_what_check_config_accepts(tmp_path):
    result = run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a", "--upstream-url", "http://127.0.0.1:3302")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "agent-proxy: warning: --upstream-url is plain http; wrote upstream.allow_insecure: true "
        "(agents' calls reach the upstream unencrypted)"
    ]
    assert yaml.safe_load((tmp_path / "agent-proxy.yaml").read_text())["upstream"]["allow_insecure"] is True
    check = run("check-config", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert check.returncode == 0, check.stderr


def test_init_refuses_to_overwrite_and_changes_nothing(tmp_path):
    (tmp_path / "psk").write_text("keep me\n")
    result = run("init", "--config-dir", str(tmp_path), "--upstream-url", "https://8.7.6.5:3302")
    assert result.returncode == 1
    assert result.stderr.strip() == f"agent-proxy: refusing to overwrite {tmp_path / 'psk'} (nothing was changed)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psk"]
    assert (tmp_path / "psk").read_text() == "keep me\n"


def test_init_with_bad_values_is_a_usage_error(tmp_path):
    result = run("init", "--config-dir", str(tmp_path), "--proxy-id", "bad id!", "--upstream-url", "https://x")
    assert result.returncode == 2 and "proxy_id: must match" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_config_lists_every_problem_and_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "http://x"}, "limits": {"threads": 0}}))
    result = run("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"agent-proxy: {path}: limits.threads: must be between 1 and 1024, got 0"]
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_exits_2_without_traceback(tmp_path):
    result = run("serve", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot read" in result.stderr


def test_environment_override_reaches_check_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "https://x"}}))
    result = run("check-config", "-c", str(path), env={"AGENT_PROXY_UPSTREAM__URL": "not a url"})
    assert result.returncode == 2 and "upstream.url: must be an http:// or https:// URL" in result.stderr


def test_environment_typo_names_the_variable_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "https://x"}}))
    result = run("check-config", "-c", str(path), env={"AGENT_PROXY_LIMTS__X": "1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["agent-proxy: AGENT_PROXY_LIMTS__X: limts: unknown key (did you mean limits?)"]


def test_unknown_command_is_a_usage_error():
    assert run("frobnicate").returncode == 2
