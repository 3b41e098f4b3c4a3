"""The configuration file: defaults, every kind of mistake named by key, environment overrides."""

import ipaddress
import json

import pytest

from agent_proxy import config as configuration
from agent_proxy.config import ConfigError
from agent_proxy.tlsutil import self_signed

MINIMAL = {"proxy_id": "site-a", "upstream": {"url": "https://8.7.6.5:3302"}}


def parse(data, environ=None):
    return configuration.parse(data, "agent-proxy.yaml", environ=environ or {})


def problems(data, environ=None):
    with pytest.raises(ConfigError) as info:
        parse(data, environ)
    return info.value.problems


def test_minimal_config_takes_every_default():
    config = parse(MINIMAL)
    assert config.listen.port == 8002
    assert config.limits.max_body_bytes == 10 * 1024 * 1024
    assert config.networks.agents == (ipaddress.ip_network("10.0.0.0/24"),)
    assert "listen.port" in config.defaulted and "proxy_id" not in config.defaulted


@pytest.mark.parametrize("upstream, timeouts", [
    ({}, (5.0, 60.0, 60.0)),
    ({"read_timeout": 20}, (5.0, 20.0, 20.0)),
    ({"read_timeout": 20, "head_timeout": 3, "idle_timeout": 7.5}, (5.0, 3.0, 7.5)),
])
def test_the_head_and_idle_timeouts_default_to_the_read_timeout(upstream, timeouts):
    assert parse({**MINIMAL, "upstream": {**MINIMAL["upstream"], **upstream}}).upstream.timeouts() == timeouts


def test_a_head_timeout_must_be_positive_seconds():
    assert problems({**MINIMAL, "upstream": {**MINIMAL["upstream"], "head_timeout": 0}}) == [
        "agent-proxy.yaml: upstream.head_timeout: must be a number of seconds, more than 0 and at most 86400, got 0"
    ]


def test_config_is_immutable():
    config = parse(MINIMAL)
    with pytest.raises(Exception):
        config.proxy_id = "other"


def test_required_keys_are_named():
    assert problems({}) == ["agent-proxy.yaml: proxy_id: required", "agent-proxy.yaml: upstream.url: required"]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({**MINIMAL, "colour": "blue"}, "colour: unknown key"),
        ({**MINIMAL, "limits": {"thread": 4}}, "limits.thread: unknown key (did you mean limits.threads?)"),
        ({**MINIMAL, "loging": {}}, "loging: unknown key (did you mean logging?)"),
        ({**MINIMAL, "proxy_id": "site a!"}, "proxy_id: must match"),
        ({**MINIMAL, "upstream": {"url": "ftp://x"}}, "upstream.url: must be an http:// or https:// URL"),
        ({**MINIMAL, "upstream": {"url": "http://8.7.6.5:3302"}}, "upstream.url: plain http upstream needs upstream.allow_insecure: true"),
        ({**MINIMAL, "networks": {"agents": ["10.0.0.1/24"]}}, "networks.agents: is not a valid CIDR network: 10.0.0.1/24 has host bits set"),
        ({**MINIMAL, "networks": {"upstream": "8.7.6.5/32"}}, "networks.upstream: must be a list"),
        ({**MINIMAL, "limits": {"threads": "many"}}, "limits.threads: must be a whole number, got 'many'"),
        ({**MINIMAL, "limits": {"max_body_bytes": -1}}, "limits.max_body_bytes: must be between 0 and 1099511627776, got -1"),
        ({**MINIMAL, "listen": {"port": 70000}}, "listen.port: must be between 1 and 65535, got 70000"),
        ({**MINIMAL, "upstream": {"url": "https://x", "ca_file": "/nonexistent/ca.pem"}}, "upstream.ca_file: cannot read file /nonexistent/ca.pem"),
        ({**MINIMAL, "upstream": {"url": "https://x", "connect_timeout": 0}}, "upstream.connect_timeout: must be a number of seconds, more than 0"),
        ({**MINIMAL, "agents": {"tls": "yes"}}, "agents.tls: must be true or false"),
        ({**MINIMAL, "logging": {"format": "xml"}}, "logging.format: must be one of json, text"),
        ({**MINIMAL, "front": {"mode": "fast"}}, "front.mode: must be one of worker, native, got 'fast'"),
        ({**MINIMAL, "trusted_proxies": ["localhost"]}, "trusted_proxies: is not an IP address: 'localhost'"),
        ({**MINIMAL, "limits": 5}, "limits: must be a mapping"),
        # a value a pattern with "$" would pass: the whole value must match
        ({**MINIMAL, "proxy_id": "site-a\n"}, "proxy_id: must match [A-Za-z0-9._-]{1,64}, got 'site-a\\n'"),
        # numbers that are not numbers, or waits nobody means
        ({**MINIMAL, "upstream": {"url": "https://x", "read_timeout": float("inf")}}, "upstream.read_timeout: must be a number of seconds, more than 0 and at most 86400, got inf"),
        ({**MINIMAL, "upstream": {"url": "https://x", "ready_window": float("nan")}}, "upstream.ready_window: must be a number of seconds"),
        ({**MINIMAL, "limits": {"drain_seconds": 1e308}}, "limits.drain_seconds: must be a number of seconds, more than 0 and at most 86400, got 1e+308"),
        ({**MINIMAL, "limits": {"max_body_bytes": 1 << 41}}, "limits.max_body_bytes: must be between 0 and 1099511627776"),
        ({**MINIMAL, "limits": {"threads": 10 ** 400}}, "limits.threads: must be between 1 and 1024, got 1000000"),
        ({**MINIMAL, "public_url": "https://bad host!:2002"}, "public_url: must not contain spaces"),
        ({**MINIMAL, "public_url": "https://4.3.2.1:2002/\x1b[31m"}, "public_url: must not contain spaces, control"),
        ({**MINIMAL, "listen": {"host": "local host"}}, "listen.host: is not an IP address or host name: 'local host'"),
        ({**MINIMAL, "listen": {"host": "127.0.0.1\n"}}, "listen.host: is not an IP address or host name"),
        ({**MINIMAL, "front": {"bind": "-eth0"}}, "front.bind: is not an IP address or host name"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(data, expected):
    found = problems(data)
    assert len(found) == 1, found
    assert found[0].startswith("agent-proxy.yaml: ") and expected in found[0]


# URLs: the host, the port, the path, the characters (public_url is checked alike, above).
@pytest.mark.parametrize("url, expected", [
    ("https://exa mple.com:3302", "upstream.url: must not contain spaces, control or non-ASCII characters"),
    ("https://b\u00fccher.example", "upstream.url: must not contain spaces, control or non-ASCII characters"),
    ("https://8.7.6.5:0", "upstream.url: has port 0"),
    ("https://8.7.6.5:65536", "upstream.url: is not a valid URL (Port out of range 0-65535)"),
    ("https://host_name:3302", "upstream.url: has a host that is neither"),
    ("https://1.2.3.4.5:3302", "upstream.url: has a host that is neither"),
    ("https://127.1:3302", "upstream.url: has a host that is neither"),
    ("https://0x7f000001:3302", "upstream.url: has a host that is neither"),
    ("https://[10.0.0.1]:3302", "upstream.url: is not a valid URL (An IPv4 address cannot be in brackets)"),
    ("https://[cp.example]:3302", "upstream.url: is not a valid URL"),
    ("https://cp.example/api%20v1", "upstream.url: has a path with characters other than"),
    ("https://cp.example/it's", "upstream.url: has a path with characters other than"),
])
def test_each_bad_upstream_url_is_one_line(url, expected):
    test_each_mistake_is_one_line_naming_the_key({**MINIMAL, "upstream": {"url": url}}, expected)


def test_all_problems_are_reported_together():
    found = problems({"proxy_id": "a", "upstream": {"url": "https://x", "pool_size": 0}, "listen": {"port": "x"}})
    assert [p.split(": ")[1] for p in found] == ["upstream.pool_size", "listen.port"]


def test_environment_overrides_the_file():
    environ = {
        "AGENT_PROXY_UPSTREAM__URL": "https://9.9.9.9:3302",
        "AGENT_PROXY_LIMITS__THREADS": "8",
        "AGENT_PROXY_NETWORKS__AGENTS": "[10.9.0.0/16, 10.8.0.0/16]",
        "UNRELATED": "x",
    }
    config = parse(MINIMAL, environ)
    assert config.upstream.url == "https://9.9.9.9:3302"
    assert config.limits.threads == 8
    assert [str(n) for n in config.networks.agents] == ["10.9.0.0/16", "10.8.0.0/16"]
    assert "limits.threads" not in config.defaulted


def test_unknown_environment_key_is_named():
    assert problems(MINIMAL, {"AGENT_PROXY_LIMITS__THREADZ": "8"}) == [
        "AGENT_PROXY_LIMITS__THREADZ: limits.threadz: unknown key (did you mean limits.threads?)"
    ]
    assert problems({**MINIMAL, "limits": {"threads": 4}}, {"AGENT_PROXY_LIMITS__THREADS": "0"}) == [
        "AGENT_PROXY_LIMITS__THREADS: limits.threads: must be between 1 and 1024, got 0"
    ]
    # The file's own mistakes still name the file.
    assert problems({**MINIMAL, "limits": {"treads": 4}}, {"AGENT_PROXY_LIMITS__THREADS": "8"}) == [
        "agent-proxy.yaml: limits.treads: unknown key (did you mean limits.threads?)"
    ]


def test_load_names_the_file_and_yaml_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("proxy_id: a\nupstream: [\n")
    with pytest.raises(ConfigError) as info:
        configuration.load(path, environ={})
    assert info.value.problems[0].startswith(f"{path}: not valid YAML (line")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        configuration.load(tmp_path / "missing.yaml", environ={})
    assert info.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"]


def test_secret_must_exist_and_be_long_enough(tmp_path):
    short = tmp_path / "psk"
    short.write_text("tiny\n")
    config = parse({**MINIMAL, "shared_secret_file": str(short)})
    with pytest.raises(ConfigError, match="holds 4 characters; at least 32 are needed"):
        config.read_secret()
    config = parse({**MINIMAL, "shared_secret_file": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="shared_secret_file: cannot read"):
        config.read_secret()


def test_effective_settings_mark_defaults_and_never_hold_the_secret(tmp_path):
    secret = tmp_path / "psk"
    secret.write_text("s3cr3t-value-that-must-not-show\n")
    config = parse({**MINIMAL, "shared_secret_file": str(secret)})
    effective = config.effective()
    assert effective["settings"]["proxy_id"] == "site-a" and "proxy_id" not in effective["defaults"]
    assert effective["settings"]["listen.port"] == 8002 and "listen.port" in effective["defaults"]
    assert effective["settings"]["networks.agents"] == ["10.0.0.0/24"]
    assert "s3cr3t" not in json.dumps(effective)


def test_tls_files_must_load_not_just_be_readable(tmp_path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    found = problems({**MINIMAL, "upstream": {"url": "https://x", "ca_file": str(junk)}})
    assert len(found) == 1 and f"upstream.ca_file: cannot load {junk} as CA certificates" in found[0]
    found = problems({**MINIMAL, "upstream": {"url": "https://x", "client_cert": str(junk), "client_key": str(junk)}})
    assert len(found) == 1 and "upstream.client_cert: cannot load" in found[0]


def test_native_mode_with_an_address_and_system_cas_is_a_warning(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(self_signed("8.7.6.5", ["8.7.6.5"])[0])
    native = {**MINIMAL, "front": {"mode": "native"}}
    assert any(w.startswith("front.mode: native with an IP address") for w in configuration.warnings(parse(native)))
    with_ca = {**native, "upstream": {**MINIMAL["upstream"], "ca_file": str(ca)}}
    by_name = {**native, "upstream": {"url": "https://upstream.example:3302"}}
    for data in (with_ca, by_name, MINIMAL):
        assert not any(w.startswith("front.mode") for w in configuration.warnings(parse(data)))


@pytest.mark.parametrize("url", [
    "https://8.7.6.5:3302", "https://[2001:db8::5]:3302", "https://cp.example.com", "http://cp-1.example:80/api/v1/",
    "https://xn--bcher-kva.example/~base/a.b_c-d",
])
def test_good_urls_pass_as_written(url):
    config = parse({**MINIMAL, "upstream": {"url": url, "allow_insecure": True}})
    assert config.upstream.url == url.rstrip("/")


def test_a_value_in_an_error_line_is_cut_short():
    found = problems({**MINIMAL, "proxy_id": "x" * 200_000})
    assert len(found) == 1 and len(found[0]) < 250 and found[0].endswith("... (200002 characters)")


def test_a_key_given_twice_is_named_with_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("proxy_id: site-a\nupstream: {url: 'https://x', url: 'https://y'}\n")
    with pytest.raises(ConfigError) as info:
        configuration.load(path, environ={})
    assert info.value.problems == [f"{path}: not valid YAML (line 2): found key 'url' twice"]
    path.write_text("proxy_id: site-a\nupstream: {url: 'https://x'}\nproxy_id: site-b\n")
    with pytest.raises(ConfigError, match=r"\(line 3\): found key 'proxy_id' twice"):
        configuration.load(path, environ={})


def test_keys_a_merge_brings_in_may_be_given_again(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("proxy_id: site-a\nbase: &base {url: 'https://x', pool_size: 4}\n"
                    "upstream:\n  <<: *base\n  url: 'https://y'\n")
    with pytest.raises(ConfigError) as info:   # the merge is fine; "base" is not a key of ours
        configuration.load(path, environ={})
    assert info.value.problems == [f"{path}: base: unknown key"]


def test_aliases_that_multiply_are_refused_at_once(tmp_path):
    # A few hundred bytes standing for 10**9 values ("billion laughs"): refused after
    # MAX_VALUES, in well under a second, not after exhausting the memory.
    lines = ["proxy_id: site-a", "upstream: {url: 'https://x'}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        configuration.load(path, environ={})
    assert info.value.problems == [f"{path}: holds more than 100000 values (YAML aliases repeating each other?)"]


@pytest.mark.parametrize("depth", [17, 600, 5000])
def test_deep_nesting_is_one_line(tmp_path, depth):
    path = tmp_path / "c.yaml"
    path.write_text("proxy_id: site-a\nupstream: {url: 'https://x'}\na: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError) as info:
        configuration.load(path, environ={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0] in (f"{path}: nested deeper than 16 levels (or a YAML alias holds itself)",
                                      f"{path}: not valid YAML: nested too deeply to read")


def test_an_environment_value_is_checked_like_the_files():
    found = problems(MINIMAL, {"AGENT_PROXY_UPSTREAM__CONNECT_TIMEOUT": ".inf"})
    assert found == ["AGENT_PROXY_UPSTREAM__CONNECT_TIMEOUT: upstream.connect_timeout: must be a number of seconds, "
                     "more than 0 and at most 86400, got inf"]
