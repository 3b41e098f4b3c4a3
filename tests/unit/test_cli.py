"""The command line as an operator meets it: real subprocesses, exit codes, one-line errors."""

import os
import stat
import subprocess
import sys

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
    assert "(names: 10.1.2.3, proxy.lan)" in result.stdout
    check = run("check-config", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert check.returncode == 0, check.stderr


def test_init_without_an_upstream_url_leaves_it_to_set(tmp_path):
    result = run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a", "--hostname", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"agent-proxy: warning: no --upstream-url: set upstream.url in {tmp_path}/agent-proxy.yaml "
                             "before serving (check-config fails until then)\n")
    assert "shared secret: " in result.stdout and "BEGIN CERTIFICATE" in result.stdout
    assert stat.S_IMODE((tmp_path / "psk").stat().st_mode) == 0o600
    text = (tmp_path / "agent-proxy.yaml").read_text()
    assert "# upstream.url is not set yet" in text and yaml.safe_load(text)["upstream"]["url"] is None
    check = run("check-config", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert check.returncode == 2 and "upstream.url" in check.stderr
    (tmp_path / "agent-proxy.yaml").write_text(text.replace("url: null", "url: https://8.7.6.5:3302"))
    assert run("check-config", "-c", str(tmp_path / "agent-proxy.yaml")).returncode == 0


def test_init_names_the_public_urls_host_in_the_certificate(tmp_path):
    # The upstream calls public_url back (registration) and verifies the certificate
    # against its host: README's example gives --hostname 10.1.2.3 and a public URL at 4.3.2.1.
    result = run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a", "--upstream-url", "https://8.7.6.5:3302",
                 "--hostname", "10.1.2.3", "--public-url", "https://4.3.2.1:2002")
    assert result.returncode == 0, result.stderr
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls" / "proxy.crt")],
                         capture_output=True, text=True, check=True).stdout
    assert "IP Address:10.1.2.3" in san and "IP Address:4.3.2.1" in san
    assert "(names: 10.1.2.3, 4.3.2.1)" in result.stdout


def test_init_warns_when_a_given_certificate_does_not_name_the_public_url(tmp_path):
    secret, cert, key = _material(tmp_path, "lb.site-a.example")
    node = tmp_path / "node"
    result = _init(node, *_given(secret, cert, key), "--public-url", "https://4.3.2.1:2002")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"agent-proxy: warning: --tls-cert {cert} does not name 4.3.2.1, the host of public_url: "
        "the upstream's handshake with this proxy will fail to verify it"]


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
    assert result.returncode == 2 and result.stderr.startswith("agent-proxy: --proxy-id: must match")
    assert list(tmp_path.iterdir()) == []


def test_check_config_lists_every_problem_and_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "http://x"}, "limits": {"threads": 0}}))
    result = run("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"agent-proxy: {path}: limits.threads: must be between 1 and 1024, got 0"]
    assert "Traceback" not in result.stderr


def test_check_config_names_a_missing_certificate_or_key(tmp_path):
    assert run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a", "--upstream-url", "https://8.7.6.5:3302").returncode == 0
    config = tmp_path / "agent-proxy.yaml"
    (tmp_path / "tls" / "proxy.key").unlink()
    (tmp_path / "tls" / "proxy.crt").unlink()
    (tmp_path / "tls" / "proxy.crt").mkdir()
    result = run("check-config", "-c", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "warning" not in line] == [
        f"agent-proxy: {config}: tls.cert_file: cannot read file {tmp_path}/tls/proxy.crt: Is a directory",
        f"agent-proxy: {config}: tls.key_file: cannot read file {tmp_path}/tls/proxy.key: no such file",
    ]


def test_serve_with_a_bad_config_exits_2_without_traceback(tmp_path):
    result = run("serve", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot read" in result.stderr


def test_environment_override_reaches_check_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "https://x"}}))
    result = run("check-config", "-c", str(path), env={"AGENT_PROXY_UPSTREAM__URL": "not a url"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "agent-proxy: AGENT_PROXY_UPSTREAM__URL: upstream.url: must not contain spaces, control or non-ASCII "
        "characters, got 'not a url'"]


def test_environment_typo_names_the_variable_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"proxy_id": "a", "upstream": {"url": "https://x"}}))
    result = run("check-config", "-c", str(path), env={"AGENT_PROXY_LIMTS__X": "1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["agent-proxy: AGENT_PROXY_LIMTS__X: limts: unknown key (did you mean limits?)"]


def test_unknown_command_is_a_usage_error():
    assert run("frobnicate").returncode == 2


# -- init with given material, renew-cert

def _init(directory, *extra):
    return run("init", "--config-dir", str(directory), "--proxy-id", "site-a", "--upstream-url", "https://8.7.6.5:3302", *extra)


def _material(tmp_path, *hostnames):
    """A certificate, key and secret made by `agent-proxy init` itself, as an operator would."""
    made = tmp_path / "made"
    assert _init(made, *[f"--hostname={h}" for h in hostnames]).returncode == 0
    return made / "psk", made / "tls" / "proxy.crt", made / "tls" / "proxy.key"


def _given(secret, cert, key):
    return "--secret-file", str(secret), "--tls-cert", str(cert), "--tls-key", str(key)


def test_init_installs_the_given_secret_certificate_and_key(tmp_path):
    secret, cert, key = _material(tmp_path, "10.1.2.3", "lb.site-a.example")
    node = tmp_path / "node"
    result = _init(node, *_given(secret, cert, key), "--hostname", "lb.site-a.example")
    assert result.returncode == 0, result.stderr
    for given, installed, mode in ((secret, node / "psk", 0o600), (cert, node / "tls" / "proxy.crt", 0o644),
                                   (key, node / "tls" / "proxy.key", 0o600)):
        assert installed.read_bytes() == given.read_bytes()
        assert stat.S_IMODE(installed.stat().st_mode) == mode
    # The given secret is not printed again; the fingerprint is the given certificate's.
    assert secret.read_text().strip() not in result.stdout
    fingerprint = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                                 capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    assert f"certificate SHA-256 fingerprint: {fingerprint}" in result.stdout
    assert run("check-config", "-c", str(node / "agent-proxy.yaml")).returncode == 0


def _expired_certificate(tmp_path, key_file):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lb.site-a.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("lb.site-a.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "expired.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_init_refuses_material_that_does_not_fit_and_writes_nothing(tmp_path):
    secret, cert, key = _material(tmp_path, "lb.site-a.example")
    _, _, other_key = _material(tmp_path / "other", "lb.site-a.example")
    short = tmp_path / "short.psk"
    short.write_text("only-31-characters-long-secret!\n")
    binary = tmp_path / "binary.psk"
    binary.write_bytes(b"\xff" * 40)
    expired = _expired_certificate(tmp_path, key)
    cases = [
        (_given(secret, cert, other_key), f"--tls-cert {cert} --tls-key {other_key}: the key does not belong to the certificate"),
        (_given(secret, cert, key) + ("--hostname", "node1.site-a.example"),
         f"--tls-cert {cert} --tls-key {key}: the certificate does not name node1.site-a.example (it names lb.site-a.example)"),
        (_given(short, cert, key), f"--secret-file {short}: holds 31 characters; at least 32 are needed"),
        (_given(binary, cert, key), f"--secret-file {binary}: not UTF-8 text"),
        (_given(secret, key, key), f"--tls-cert {key} --tls-key {key}: not a PEM certificate"),
        (_given(secret, cert, cert), f"--tls-cert {cert} --tls-key {cert}: not an unencrypted PEM private key"),
        (_given(secret, cert, tmp_path / "missing.key"), f"--tls-key {tmp_path / 'missing.key'}: cannot read: No such file or directory"),
        (("--tls-cert", str(cert)), "--tls-cert and --tls-key go together"),
    ]
    for args, message in cases:
        node = tmp_path / "node"
        result = _init(node, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"agent-proxy: {message}"), result.stderr
        assert not node.exists(), args
    result = _init(tmp_path / "node", *_given(secret, expired, key))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert f"--tls-cert {expired} --tls-key {key}: the certificate is valid from " in result.stderr
    assert result.stderr.rstrip().endswith("UTC, not now") and not (tmp_path / "node").exists()


def _certificate(path):
    from cryptography import x509
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_renew_cert_keeps_the_key_and_the_names(tmp_path):
    assert _init(tmp_path, "--hostname", "10.1.2.3", "--hostname", "lb.site-a.example").returncode == 0
    cert_file, key_file = tmp_path / "tls" / "proxy.crt", tmp_path / "tls" / "proxy.key"
    old_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    result = run("renew-cert", "-c", str(tmp_path / "agent-proxy.yaml"), "--days", "30")
    assert result.returncode == 0, result.stderr
    new_pem = cert_file.read_bytes()
    assert new_pem != old_pem and key_file.read_bytes() == key_pem
    assert stat.S_IMODE(cert_file.stat().st_mode) == 0o644
    new = _certificate(cert_file)
    fingerprint = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert_file)],
                                 capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    assert result.stdout.splitlines()[-1] == f"certificate SHA-256 fingerprint: {fingerprint}"
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "IP Address:10.1.2.3, DNS:lb.site-a.example" in san
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 30
    # The renewed certificate still goes with the key (openssl compares the public keys).
    pubkeys = [subprocess.run(["openssl", *cmd], capture_output=True, check=True).stdout
               for cmd in (["x509", "-noout", "-pubkey", "-in", str(cert_file)], ["pkey", "-pubout", "-in", str(key_file)])]
    assert pubkeys[0] == pubkeys[1]


def test_renew_cert_with_an_unreadable_key_is_one_line_exit_2(tmp_path):
    assert _init(tmp_path).returncode == 0
    (tmp_path / "tls" / "proxy.key").write_text("garbage\n")
    before = (tmp_path / "tls" / "proxy.crt").read_bytes()
    result = run("renew-cert", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "cannot renew: not an unencrypted PEM private key" in result.stderr
    assert (tmp_path / "tls" / "proxy.crt").read_bytes() == before


def test_a_yaml_alias_holding_itself_is_one_line_exit_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("proxy_id: a\nupstream: {url: 'http://x'}\nloop: &a [*a]\n")
    result = run("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"agent-proxy: {path}: nested deeper than 16 levels (or a YAML alias holds itself)"]


@pytest.mark.parametrize("args, line", [
    (["renew-cert", "--days", "0"], "--days 0: expected a number of days, 1 to 3650"),
    (["renew-cert", "--days", "-5"], "--days -5: expected a number of days, 1 to 3650"),
    (["renew-cert", "--days", "3000000"], "--days 3000000: expected a number of days, 1 to 3650"),
    (["serve", "--port", "99999"], "--port 99999: expected a TCP port, 1-65535"),
    (["serve", "--port", "0"], "--port 0: expected a TCP port, 1-65535"),
    (["lb", "status", "--server", "node1", "--socket", "/nonexistent", "--timeout", "-1"],
     "--timeout -1: expected a number of seconds, 0 or more"),
    (["lb", "status", "--server", "node1", "--socket", "/nonexistent", "--timeout", "nan"],
     "--timeout nan: expected a number of seconds, 0 or more"),
])
def test_numbers_out_of_range_are_one_line_exit_2_and_change_nothing(tmp_path, args, line):
    assert _init(tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run(*args, "-c", str(tmp_path / "agent-proxy.yaml"))
    assert (result.returncode, result.stderr.splitlines()) == (2, [f"agent-proxy: {line}"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -- init's options, and other commands' inputs, checked before anything is written

@pytest.mark.parametrize("hostname", ["bad host!", "b\u00fccher.example", "https://x.example/", "x" * 300, "1.2.3.4.5", "-lead.example"])
def test_init_refuses_a_hostname_that_is_not_one(tmp_path, hostname):
    result = _init(tmp_path / "d", f"--hostname={hostname}")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("agent-proxy: --hostname ") and "not an IP address or a host name" in result.stderr
    assert not (tmp_path / "d").exists()


def test_init_takes_several_hostnames_after_one_option(tmp_path):
    assert _init(tmp_path, "--hostname", "10.1.2.3", "proxy.lan").returncode == 0
    san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls" / "proxy.crt")],
                         capture_output=True, text=True, check=True).stdout
    assert "IP Address:10.1.2.3" in san and "DNS:proxy.lan" in san


def test_init_with_an_ipv6_hostname_brackets_it_in_the_public_url(tmp_path):
    result = _init(tmp_path, "--hostname", "2001:db8::3")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "agent-proxy.yaml").read_text())["public_url"] == "https://[2001:db8::3]:2002"


def test_init_names_the_option_a_bad_value_came_from(tmp_path):
    result = _init(tmp_path / "d", "--public-url", "notaurl")
    assert result.returncode == 2
    assert result.stderr.startswith("agent-proxy: --public-url: must be an http:// or https:// URL with a host")
    result = run("init", "--config-dir", str(tmp_path / "d"), "--proxy-id", "", "--upstream-url", "https://8.7.6.5:3302")
    assert (result.returncode, result.stderr) == (2, "agent-proxy: --proxy-id: must match [A-Za-z0-9._-]{1,64}, got ''\n")
    assert not (tmp_path / "d").exists()


def test_init_warns_of_a_plain_http_public_url(tmp_path):
    result = _init(tmp_path, "--public-url", "http://4.3.2.1:2002")
    assert result.returncode == 0
    assert "warning: public_url is plain http; the upstream will reach this proxy without TLS" in result.stderr


def test_init_with_a_relative_directory_writes_absolute_paths(tmp_path):
    result = subprocess.run([AGENT_PROXY, "init", "--config-dir", "rel", "--proxy-id", "a", "--upstream-url", "https://x"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "rel" / "agent-proxy.yaml").read_text())
    assert config["shared_secret_file"] == str(tmp_path / "rel" / "psk")
    assert run("check-config", "-c", str(tmp_path / "rel" / "agent-proxy.yaml")).returncode == 0   # from elsewhere


def test_renew_cert_refuses_a_key_that_is_not_the_certificates(tmp_path):
    assert _init(tmp_path / "a").returncode == 0 and _init(tmp_path / "b").returncode == 0
    cert = tmp_path / "a" / "tls" / "proxy.crt"
    (tmp_path / "a" / "tls" / "proxy.key").write_bytes((tmp_path / "b" / "tls" / "proxy.key").read_bytes())
    before = cert.read_bytes()
    result = run("renew-cert", "-c", str(tmp_path / "a" / "agent-proxy.yaml"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "cannot renew: the key is not the certificate's" in result.stderr and cert.read_bytes() == before


def test_renew_cert_of_a_certificate_without_alternative_names_keeps_its_common_name(tmp_path):
    assert _init(tmp_path).returncode == 0
    cert, key = tmp_path / "tls" / "proxy.crt", tmp_path / "tls" / "proxy.key"
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=old.site-a.example",
                    "-days", "5", "-out", str(cert)], check=True, capture_output=True)
    result = run("renew-cert", "-c", str(tmp_path / "agent-proxy.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {cert} for old.site-a.example, valid 825 days")
    assert "DNS:old.site-a.example" in subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)], capture_output=True, text=True).stdout


def test_an_empty_config_path_is_one_line():
    result = run("check-config", "-c", "")
    assert (result.returncode, result.stderr) == (2, "agent-proxy: the configuration file's path is empty\n")


def test_render_refuses_a_variable_that_would_change_the_files_syntax(tmp_path):
    assert _init(tmp_path).returncode == 0
    config = str(tmp_path / "agent-proxy.yaml")
    result = run("render", "lb-haproxy", "-c", config, "--set", 'nodes=[{name: "a b; evil", address: "1.2.3.4\\nbind :80"}]')
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "agent-proxy: template variable nodes[0].name: 'a b; evil' holds a space, a line break or one of ; # \" ' { } \\ $ `",
        "agent-proxy: template variable nodes[0].address: '1.2.3.4\\nbind :80' holds a space, a line break or one of ; # \" ' { } \\ $ `",
    ]
    good = run("render", "lb-haproxy", "-c", config, "--set", "nodes=[{name: node1, address: 10.1.2.11}]")
    assert good.returncode == 0 and "server node1 10.1.2.11:2002" in good.stdout


def test_register_without_a_public_url_is_a_configuration_error(tmp_path):
    assert _init(tmp_path).returncode == 0
    path = tmp_path / "agent-proxy.yaml"
    data = yaml.safe_load(path.read_text())
    del data["public_url"]
    path.write_text(yaml.safe_dump(data))
    result = run("register", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2, f"agent-proxy: {path}: public_url: not set; the upstream needs it to reach this proxy\n")


def test_an_upstreams_words_reach_the_terminal_escaped(tmp_path):
    """A register against an upstream answering garbage: one line, its bytes escaped."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"garbage\x1b[2J\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    assert _init(tmp_path).returncode == 0
    path = tmp_path / "agent-proxy.yaml"
    data = yaml.safe_load(path.read_text())
    data["upstream"] = {"url": f"http://127.0.0.1:{port}", "allow_insecure": True}
    path.write_text(yaml.safe_dump(data))
    result = run("register", "-c", str(path))
    thread.join(10)
    listener.close()
    assert result.returncode == 1
    assert result.stderr == (f"agent-proxy: talking to the upstream http://127.0.0.1:{port} failed: "
                             "garbage\\x1b[2J\\r\\n\n")


def test_serve_that_cannot_listen_says_why_on_stderr(tmp_path):
    import socket

    assert _init(tmp_path).returncode == 0
    path = tmp_path / "agent-proxy.yaml"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("serve", "-c", str(path), "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"agent-proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    data = yaml.safe_load(path.read_text())
    data["listen"] = {"host": "no-such-host.invalid", "port": 8002}
    path.write_text(yaml.safe_dump(data))
    result = run("serve", "-c", str(path))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("agent-proxy: cannot listen on no-such-host.invalid:8002: ")


def test_commands_other_than_serve_start_without_falcon(tmp_path):
    # Each command an appliance's role or an operator runs pays for what it imports; under
    # a slow CPU Falcon alone is seconds, and only the server needs it.
    assert run("init", "--config-dir", str(tmp_path), "--proxy-id", "site-a",
               "--upstream-url", "https://8.7.6.5:3302").returncode == 0
    config = str(tmp_path / "agent-proxy.yaml")
    # The command as the console script runs it; at exit, whether Falcon was ever imported.
    probe = ("import atexit, sys\natexit.register(lambda: print('falcon' in sys.modules, file=sys.stderr))\n"
             "from agent_proxy.cli import main\nsys.exit(main(sys.argv[1:]))")
    for argv in (["check-config", "-c", config], ["render", "node-haproxy", "-c", config], ["--help"]):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stderr.splitlines()[-1] == "False", (argv, result.stderr)
