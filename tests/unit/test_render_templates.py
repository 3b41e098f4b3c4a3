"""The node front, balancer and nginx templates: rendered through the CLI, checked by the real tools."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent_proxy.cli import main
from agent_proxy.tlsutil import self_signed
from kit import HAPROXY, NGINX, SECRET, write_config

NODES = {"nodes": [{"name": "node1", "address": "10.1.2.11"}, {"name": "node2", "address": "10.1.2.12", "port": 2102}]}


def render(capsys, name: str, config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["render", name, "-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def haproxy_check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    done = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def nginx_check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    done = subprocess.run([NGINX, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def config(tmp_path: Path, **front) -> Path:
    return write_config(
        tmp_path, "https://8.7.6.5:3302",
        listen={"host": "127.0.0.1", "port": 8002},
        upstream={"connect_timeout": 5, "read_timeout": 60},
        front={"workers": 3, "stats_socket": str(tmp_path / "haproxy.sock"), **front},
    )


@pytest.mark.parametrize("front", [
    {"balancers": [], "max_conn_per_source": 0},
    {"balancers": ["10.1.2.0/28", "192.0.2.7/32"], "max_conn_per_source": 50},
], ids=["alone", "behind-balancers"])
def test_node_haproxy_renders_a_valid_front(tmp_path, capsys, front):
    code, text, err = render(capsys, "node-haproxy", config(tmp_path, **front))
    assert code == 0, err
    haproxy_check(tmp_path, text)
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2" in text
    assert re.search(r"^    bind 0\.0\.0\.0:2002 ssl crt \S+/proxy\.crt$", text, re.M)
    assert "http-check send meth GET uri /_proxy/health ver HTTP/1.1 hdr Host 127.0.0.1" in text
    assert "http-check expect status 200" in text
    assert len(re.findall(r"^    default-server ", text, re.M)) == 1
    assert re.findall(r"^    server (\S+) (\S+)$", text, re.M) == [
        ("worker8002", "127.0.0.1:8002"), ("worker8003", "127.0.0.1:8003"), ("worker8004", "127.0.0.1:8004"),
    ]
    assert "http-request del-header X-Forwarded- -m beg" in text and "option forwardfor" in text
    assert "retry-on conn-failure empty-response" in text
    assert "stats socket " + str(tmp_path / "haproxy.sock") + " mode 600 level admin" in text
    assert "cookie" not in text and "stick on" not in text and "balance source" not in text
    # The worker gives up after 5 + 60 s and answers 504; HAProxy must wait longer.
    assert int(re.search(r"timeout server (\d+)s", text).group(1)) > 65
    if front["balancers"]:
        assert "tcp-request connection expect-proxy layer4 if { src 10.1.2.0/28 192.0.2.7/32 }" in text
        assert "tcp-request session reject if { sc0_conn_cur gt 50 }" in text
    else:
        assert "expect-proxy" not in text and "accept-proxy" not in text
        assert "stick-table" not in text


def test_node_haproxy_holds_many_idle_clients_when_asked(tmp_path, capsys):
    """front.max_connections and the extra variables for a front of mostly idle clients
    (bench --scale); without them, strict limits and the default timeouts."""
    cfg = config(tmp_path, max_connections=12000)
    code, text, err = render(capsys, "node-haproxy", cfg, "--set", "strict_limits=false",
                             "--set", "client_idle_timeout=300s")
    assert code == 0, err
    haproxy_check(tmp_path, text)
    assert re.findall(r"^    maxconn (\d+)$", text, re.M) == ["12064", "12000"]
    assert re.search(r"^global\n(    .*\n)*    no strict-limits$", text, re.M)
    assert re.findall(r"^    timeout (client|http-request|http-keep-alive) (\S+)$", text, re.M) == [
        ("client", "300s"), ("http-request", "300s"), ("http-keep-alive", "300s")]
    code, text, err = render(capsys, "node-haproxy", cfg)
    assert code == 0, err
    assert "strict-limits" not in text
    assert re.findall(r"^    timeout (client|http-request|http-keep-alive) (\S+)$", text, re.M) == [
        ("client", "80s"), ("http-request", "10s"), ("http-keep-alive", "10s")]


def sections(text: str) -> dict[str, list[str]]:
    """The rendered HAProxy file's sections ("frontend agent_proxy", ...) and their lines."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = found.setdefault(line, [])
        elif line.startswith("    ") and not line.lstrip().startswith("#"):
            current.append(line.strip())
    return found


def test_node_haproxy_control_apart_scrubs_and_pools_as_the_agent_side(tmp_path, capsys):
    cfg = write_config(tmp_path, "https://8.7.6.5:3302", listen={"host": "127.0.0.1", "port": 8002},
                       listen_control={"host": "127.0.0.1", "port": 9002},
                       front={"workers": 2, "stats_socket": str(tmp_path / "haproxy.sock")})
    code, text, err = render(capsys, "node-haproxy", cfg)
    assert code == 0, err
    haproxy_check(tmp_path, text)
    found = sections(text)
    scrub = ["http-request del-header Forwarded", "http-request del-header X-Real-IP",
             "http-request del-header X-Forwarded- -m beg", "http-request del-header X-Agent-Proxy- -m beg",
             "http-request set-header X-Forwarded-Proto https"]
    for frontend in ("frontend agent_proxy", "frontend agent_proxy_control"):
        assert all(line in found[frontend] for line in scrub), found[frontend]
    workers, control = found["backend workers"], found["backend control_workers"]
    default_server = [line for line in workers if line.startswith("default-server ")]
    assert default_server == [line for line in control if line.startswith("default-server ")]
    assert re.search(r" maxconn \d+ pool-max-conn 64$", default_server[0])
    assert [line for line in workers if not line.startswith(("server ", "http-check send "))] == \
        [line for line in control if not line.startswith(("server ", "http-check send "))]
    assert [line for line in control if line.startswith("server ")] == [
        "server worker8002 127.0.0.1:9002", "server worker8003 127.0.0.1:9003"]


def test_node_haproxy_finds_a_key_beside_the_certificate(tmp_path, capsys):
    code, text, _ = render(capsys, "node-haproxy", config(tmp_path))
    assert "ssl-load-extra-del-ext" in text  # proxy.crt + proxy.key, as `agent-proxy init` writes them
    haproxy_check(tmp_path, text)


def test_node_haproxy_asks_for_a_bundle_when_the_key_is_elsewhere(tmp_path, capsys):
    path = config(tmp_path)
    (tmp_path / "keys").mkdir()
    shutil.move(tmp_path / "proxy.key", tmp_path / "keys" / "site.key")
    data = yaml.safe_load(path.read_text())
    data["tls"]["key_file"] = str(tmp_path / "keys" / "site.key")
    path.write_text(yaml.safe_dump(data))

    code, text, err = render(capsys, "node-haproxy", path)
    assert code == 2 and text == ""
    assert err.strip() == "agent-proxy: render node-haproxy: missing variable: 'crt_bundle' is undefined (pass it with --set or --vars)"

    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "proxy.crt").read_bytes() + (tmp_path / "keys" / "site.key").read_bytes())
    code, text, err = render(capsys, "node-haproxy", path, "--set", f"crt_bundle={bundle}")
    assert code == 0, err
    assert f"ssl crt {bundle}" in text and "ssl-load-extra-del-ext" not in text
    haproxy_check(tmp_path, text)


def native_config(tmp_path: Path, **upstream) -> Path:
    """A native-mode config and its signing key map, as the role writes them."""
    path = config(tmp_path, mode="native")
    data = yaml.safe_load(path.read_text())
    data["upstream"].update(upstream)
    path.write_text(yaml.safe_dump(data))
    code = main(["render", "node-haproxy-key", "-c", str(path)])
    assert code == 0
    return path


def test_node_haproxy_key_is_the_secret_in_base64(tmp_path, capsys):
    code, text, _ = render(capsys, "node-haproxy-key", config(tmp_path))
    assert code == 0
    assert text == "key " + base64.b64encode(SECRET.encode()).decode() + "\n"


def test_native_front_relays_northbound_and_passes_the_rest_to_the_workers(tmp_path, capsys):
    path = native_config(tmp_path, url="https://up.example:3302/api/base/")
    capsys.readouterr()
    (tmp_path / "psk.haproxy-map").write_text("key " + base64.b64encode(SECRET.encode()).decode() + "\n")
    code, text, err = render(capsys, "node-haproxy", path)
    assert code == 0, err
    haproxy_check(tmp_path, text)
    assert f"set-var proc.ap_key str(key),map({tmp_path}/psk.haproxy-map)" in text
    assert "use_backend upstream unless ap_to_workers" in text
    assert "http-request set-pathq /api/base%[pathq]" in text
    assert "http-request set-header Host up.example:3302" in text
    assert re.search(r"^    server upstream up\.example:3302 ssl verify required ca-file @system-ca sni str\(up\.example\) init-addr last,libc,none$", text, re.M)
    assert "prometheus-exporter" in text
    code, worker_text, _ = render(capsys, "node-haproxy", config(tmp_path / "worker"))
    assert "backend upstream" not in worker_text and "proc.ap_key" not in worker_text


def test_native_front_asks_for_a_client_bundle_when_the_key_is_elsewhere(tmp_path, capsys):
    (tmp_path / "keys").mkdir()
    cert, key = self_signed("site-a", ["site-a"])
    (tmp_path / "client.pem").write_bytes(cert)
    (tmp_path / "keys" / "client-key.pem").write_bytes(key)
    path = native_config(tmp_path, url="https://up.example:3302", client_cert=str(tmp_path / "client.pem"),
                         client_key=str(tmp_path / "keys" / "client-key.pem"))
    capsys.readouterr()
    code, text, err = render(capsys, "node-haproxy", path)
    assert code == 2 and "'upstream_client_bundle' is undefined" in err
    code, text, err = render(capsys, "node-haproxy", path, "--set", "upstream_client_bundle=/etc/agent-proxy/tls/client.pem")
    assert code == 0 and " crt /etc/agent-proxy/tls/client.pem" in text


def test_lb_haproxy_renders_a_valid_balancer(tmp_path, capsys):
    variables = tmp_path / "nodes.yaml"
    variables.write_text(yaml.safe_dump(NODES))
    code, text, err = render(capsys, "lb-haproxy", config(tmp_path), "--vars", str(variables), "--set", "monitor_port=9404")
    assert code == 0, err
    haproxy_check(tmp_path, text)
    assert re.findall(r"^    server (\S+) (\S+)$", text, re.M) == [("node1", "10.1.2.11:2002"), ("node2", "10.1.2.12:2102")]
    assert "mode tcp" in text and "balance leastconn" in text
    default_server = re.search(r"^    default-server (.*)$", text, re.M).group(1)
    for option in ("check", "check-ssl", "verify none", "send-proxy-v2", "inter 1s", "fall 2", "rise 2"):
        assert option in default_server
    assert "http-check send meth GET uri /_proxy/health ver HTTP/1.1" in text
    assert "http-check expect status 200" in text
    assert "bind 0.0.0.0:9404" in text and "monitor-uri /_lb/health" in text


def test_lb_haproxy_without_nodes_is_a_clear_usage_error(tmp_path, capsys):
    code, text, err = render(capsys, "lb-haproxy", config(tmp_path))
    assert code == 2 and text == ""
    assert err.strip() == "agent-proxy: render lb-haproxy: missing variable: 'nodes' is undefined (pass it with --set or --vars)"



@pytest.mark.parametrize("value", ["5", "node1", "{name: node1}", "[5]"])
def test_a_variable_of_the_wrong_shape_is_one_line_not_a_traceback(tmp_path, capsys, value):
    code, text, err = render(capsys, "lb-haproxy", config(tmp_path), "--set", f"nodes={value}")
    assert code == 2 and text == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("agent-proxy: render lb-haproxy: ")
    if value == "5":
        assert "a variable from --set or --vars has the wrong type or shape ('int' object is not iterable)" in err


def test_a_variables_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    variables = tmp_path / "vars.yaml"
    variables.write_text("nodes: [\n  {name: node1\n")
    code, text, err = render(capsys, "lb-haproxy", config(tmp_path), "--vars", str(variables))
    assert code == 2 and text == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"agent-proxy: {variables}: cannot read the template variables: not valid YAML (line 3): ")

@pytest.mark.parametrize("front", [
    {"balancers": [], "max_conn_per_source": 0},
    {"balancers": ["10.1.2.0/28"], "max_conn_per_source": 50},
], ids=["alone", "behind-balancers"])
def test_node_nginx_renders_a_valid_nginx_conf(tmp_path, capsys, front):
    code, text, err = render(capsys, "node-nginx", config(tmp_path, **front), "--set", f"nginx_pid={tmp_path / 'nginx.pid'}")
    assert code == 0, err
    nginx_check(tmp_path, text)
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert re.findall(r"^        server (\S+) max_fails=1 fail_timeout=5s;$", text, re.M) == [
        "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004",
    ]
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text
    assert 'proxy_set_header Forwarded "";' in text
    if front["balancers"]:
        assert "listen 0.0.0.0:2002 ssl proxy_protocol;" in text
        assert "set_real_ip_from 10.1.2.0/28;" in text and "real_ip_header proxy_protocol;" in text
        assert "limit_conn per_source 50;" in text
    else:
        assert "listen 0.0.0.0:2002 ssl;" in text
        assert "real_ip" not in text and "limit_conn" not in text


@pytest.mark.parametrize("template, front", [
    ("node-haproxy", {"mode": "worker"}), ("node-haproxy", {"mode": "native"}), ("node-nginx", {}),
], ids=["haproxy-worker", "haproxy-native", "nginx"])
def test_every_answer_a_front_makes_is_a_catalogue_error_in_json(tmp_path, capsys, template, front):
    """Each answer the front makes itself: the catalogue's status and title, a JSON body that
    survives the config's single quotes."""
    from agent_proxy.errors import CATALOGUE

    if front.get("mode") == "native":
        (tmp_path / "psk.haproxy-map").write_text("key " + base64.b64encode(SECRET.encode()).decode() + "\n")
    code, text, err = render(capsys, template, config(tmp_path, **front))
    assert code == 0, err
    if template == "node-nginx":
        answers = re.findall(r"add_header X-Agent-Proxy-Error (\S+) always;\s+(?:add_header .*\s+)*return (\d+) '(.*)';", text)
        made = text.count("add_header X-Agent-Proxy-Error ")
    else:
        answers = re.findall(r"status (\d+) content-type application/json hdr X-Agent-Proxy-Error (\S+) .*?'(.*)'", text)
        answers = [(name, status, body) for status, name, body in answers]
        made = text.count("hdr X-Agent-Proxy-Error ")
    assert len(answers) == made >= 3
    for name, status, body in answers:
        error = CATALOGUE[name]
        # HAProxy's own 503 for "no connection" is turned into the contract's 502 (native).
        assert int(status) == error.status or (name, status) == ("upstream-unreachable", "503")
        assert "'" not in body, body  # it would end the config's string early
        parsed = json.loads(body)
        assert set(parsed) == {"title", "description"} and parsed["title"] == error.title
    (haproxy_check if template == "node-haproxy" else nginx_check)(tmp_path, text)
