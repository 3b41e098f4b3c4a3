"""`make deb` (deb/build.sh): the package the image, the role and operators install.

Builds the package once into a scratch folder (about 40 s, pip registry and lintian
included) and reads it the way dpkg and a node would: its control fields, files, modes,
conffiles, the virtualenv it unpacks, and the maintainer scripts' answers that need no
running system. What the scripts do on a node (upgrade, remove, purge, reinstall) is
tested in the booted image (packer/test-image.sh).
"""

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kit import PYTHON, Process, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "app" / "requirements.lock"
VENV = "/opt/agent-proxy"
UNITS = ["agent-proxy@.service", "agent-proxy.target", "agent-proxy-front.service"]


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run([str(ROOT / "deb" / "build.sh")], env={**os.environ, "DEB_OUT": str(out)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    deb, = out.glob("agent-proxy_*_amd64.deb")
    tree = out / "tree"
    run("dpkg-deb", "-R", str(deb), str(tree))
    return {"deb": deb, "tree": tree, "out": out, "said": result.stdout}


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def test_the_version_carries_the_product_version_and_the_lock_revision(built):
    product = re.search(r'__version__ = "(.+)"', (ROOT / "app/agent_proxy/__init__.py").read_text())[1]
    revision = re.match(r"# lock-revision: (\d+)", LOCK.read_text())[1]
    version = field(built["deb"], "Version")
    assert version == f"{product}+lock{revision}"
    assert built["deb"].name == f"agent-proxy_{version}_amd64.deb"
    # A rebuild with the next lock revision is an upgrade for dpkg.
    run("dpkg", "--compare-versions", f"{product}+lock{int(revision) + 1}", "gt", version)
    assert "lintian: no error or warning" in built["said"]


def test_the_record_of_inputs_names_the_lock_and_every_installed_release(built):
    record = built["deb"].with_suffix(".buildinfo").read_text()
    assert f"Lock-Sha256: {hashlib.sha256(LOCK.read_bytes()).hexdigest()}" in record
    assert hashlib.sha256(built["deb"].read_bytes()).hexdigest() in record
    locked = set(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", LOCK.read_text(), re.M))
    listed = set(re.findall(r"^ ([A-Za-z0-9._-]+)==(\S+)$", record, re.M))
    norm = {(name.lower().replace("_", "-"), v) for name, v in listed}
    assert {(name.lower().replace("_", "-"), v) for name, v in locked} <= norm
    assert len(norm) == len(locked) + 1  # and agent-proxy itself, nothing else


def test_every_file_belongs_to_root_and_none_is_writable_by_others_or_setuid(built):
    listing = run("dpkg-deb", "--contents", str(built["deb"])).stdout.splitlines()
    assert listing
    for line in listing:
        mode, owner = line.split()[:2]
        assert owner == "root/root", line
        assert mode[0] == "l" or mode[8] != "w" and "s" not in mode, line


def test_the_command_units_and_system_files_are_where_a_node_looks(built):
    tree = built["tree"]
    assert os.readlink(tree / "usr/bin/agent-proxy") == f"{VENV}/bin/agent-proxy"
    for unit in UNITS:
        assert (tree / "lib/systemd/system" / unit).read_bytes() == (ROOT / "appliance/systemd" / unit).read_bytes()
    firstboot = (tree / "lib/systemd/system/agent-proxy-firstboot.service").read_text()
    # Every program a unit runs is in the package and executable.
    for unit in [*UNITS, "agent-proxy-firstboot.service", "agent-proxy-register.service"]:
        text = (tree / "lib/systemd/system" / unit).read_text()
        for program in re.findall(r"^Exec(?:Start|Reload)=-?(/\S+)", text, re.M):
            if program.startswith((VENV, "/usr/libexec/agent-proxy")):
                assert os.access(tree / program.lstrip("/"), os.X_OK), f"{unit}: {program}"
    assert "ExecStart=/usr/libexec/agent-proxy/agent-proxy-firstboot" in firstboot
    register = (tree / "lib/systemd/system/agent-proxy-register.service").read_text()
    assert "ExecStart=/usr/libexec/agent-proxy/agent-proxy-register" in register
    user = re.search(r"^User=(\S+)", (tree / "lib/systemd/system/agent-proxy@.service").read_text(), re.M)[1]
    assert (tree / "usr/lib/sysusers.d/agent-proxy.conf").read_text().count(f"\nu {user} ") == 1
    assert "d /var/lib/agent-proxy " in (tree / "usr/lib/tmpfiles.d/agent-proxy.conf").read_text()
    assert (tree / "etc/agent-proxy/tls").is_dir()
    assert (tree / "usr/share/doc/agent-proxy/copyright").is_file()
    assert (tree / "usr/share/doc/agent-proxy/changelog.gz").is_file()


def test_the_conffiles_are_the_shipped_defaults_and_never_the_nodes_config_or_keys(built):
    tree = built["tree"]
    conffiles = (tree / "DEBIAN/conffiles").read_text().split()
    assert conffiles == ["/etc/security/limits.d/60-agent-proxy-limits.conf", "/etc/sysctl.d/60-agent-proxy.conf"]
    shipped_etc = sorted("/" + str(p.relative_to(tree)) for p in (tree / "etc").rglob("*") if p.is_file())
    assert shipped_etc == conffiles
    assert not [p for p in (tree / "etc/agent-proxy").rglob("*") if p.is_file()]


def test_the_virtualenv_names_opt_agent_proxy_and_runs_on_its_own(built):
    venv = built["tree"] / VENV.lstrip("/")
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.read_bytes().startswith(b"#!"):
            assert script.read_text().splitlines()[0] == f"#!{VENV}/bin/python", script.name
    assert f"command = /usr/bin/python3 -m venv --without-pip {VENV}" in (venv / "pyvenv.cfg").read_text()
    leaks = subprocess.run(["grep", "-rlI", "-e", str(built["out"]), "-e", str(ROOT), str(built["tree"])],
                           capture_output=True, text=True)
    assert leaks.returncode == 1, f"files name the build host's paths: {leaks.stdout[:500]}"
    assert not (venv / "bin/pip").exists()
    # The unpacked interpreter finds the package's own libraries, not the repository's .venv.
    answer = run(str(venv / "bin/python"), "-I", "-c",
                 "import agent_proxy, cryptography, falcon, waitress, yaml; print(agent_proxy.__file__)")
    assert answer.stdout.strip().startswith(str(venv / "lib"))
    assert run(str(venv / "bin/python"), "-I", str(venv / "bin/agent-proxy"), "version").stdout.startswith("agent-proxy ")
    # Byte code was compiled for the node's paths.
    pyc = next((venv / "lib").rglob("agent_proxy/__pycache__/cli.*.pyc"))
    assert f"{VENV}/lib/".encode() in pyc.read_bytes()


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_a_maintainer_script_refuses_an_action_it_does_not_know_in_one_line(built, script):
    path = built["tree"] / "DEBIAN" / script
    assert os.access(path, os.X_OK)
    run("sh", "-n", str(path))
    result = subprocess.run([str(path), "no-such-action"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"{script} called with unknown argument 'no-such-action'\n"


def test_every_lintian_override_says_why(built):
    """Each override, or the group of overrides it belongs to, comes after a comment."""
    lines = (built["tree"] / "usr/share/lintian/overrides/agent-proxy").read_text().splitlines()
    assert any(line.startswith("agent-proxy:") for line in lines)
    for index, line in enumerate(lines):
        if line.startswith("agent-proxy:"):
            above = index - 1
            while above >= 0 and lines[above].startswith("agent-proxy:"):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"no reason given for: {line}"


def apt_sandbox(root: Path, repo: Path | None, keyring: Path | None) -> list[str]:
    """apt's options for a private apt tree under ROOT whose only source is REPO, trusted with
    KEYRING (no REPO: whatever ROOT/etc/apt/sources.list.d holds)."""
    for folder in ["etc/apt/preferences.d", "etc/apt/apt.conf.d", "etc/apt/trusted.gpg.d", "etc/apt/sources.list.d", "var/lib/apt/lists/partial",
                   "var/cache/apt/archives/partial", "var/lib/dpkg", "var/log/apt"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "etc/apt/sources.list").write_text(f"deb [signed-by={keyring}] file:{repo}/ ./\n" if repo else "")
    return ["-o", f"Dir={root}", "-o", f"Dir::State::status={root}/var/lib/dpkg/status",
            "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1"]


def test_make_apt_repo_serves_the_package_signed_and_apt_refuses_it_with_another_key(built, tmp_path):
    said = run(str(ROOT / "deb" / "apt-repo.sh"), env={**os.environ, "DEB_OUT": str(built["out"])}).stdout
    repo = built["out"] / "apt-repo"
    assert said.startswith(f"apt-repo: {repo} holds {built['deb'].name}, signed by ")
    options = apt_sandbox(tmp_path / "node", repo, repo / "agent-proxy-archive.gpg")
    run("apt-get", *options, "update")
    policy = run("apt-cache", *options, "policy", "agent-proxy").stdout
    assert f"Candidate: {field(built['deb'], 'Version')}" in policy
    run("apt-get", *options, "download", "agent-proxy", cwd=tmp_path)
    fetched, = tmp_path.glob("agent-proxy_*.deb")
    assert fetched.read_bytes() == built["deb"].read_bytes()

    # A node that trusts another key gets nothing from the repository.
    other = tmp_path / "other-gnupg"
    other.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--quiet", "--homedir", str(other)]
    run(*gpg, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-generate-key", "other <other@localhost>",
        "ed25519", "sign", "never")
    (tmp_path / "other.gpg").write_bytes(subprocess.run([*gpg, "--export"], capture_output=True, check=True).stdout)
    run("gpgconf", "--homedir", str(other), "--kill", "gpg-agent")   # gpg left it running
    options = apt_sandbox(tmp_path / "stranger", repo, tmp_path / "other.gpg")
    refused = subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True)
    assert refused.returncode != 0 and "NO_PUBKEY" in refused.stdout + refused.stderr
    assert field(built["deb"], "Version") not in run("apt-cache", *options, "policy", "agent-proxy").stdout


ANSIBLE_PLAYBOOK = ROOT / ".venv" / "bin" / "ansible-playbook"
ROLE_PLAY = """
- name: The agent_proxy_package role
  hosts: node
  gather_facts: false
  tasks:
    - name: The role
      ansible.builtin.include_role:
        name: agent_proxy_package
        tasks_from: "{{ entry }}"
"""


def role_play(tmp_path: Path, entry: str, **variables) -> subprocess.CompletedProcess:
    """ansible-playbook running the role's ``entry`` tasks on this machine (a local connection)."""
    inventory = {"all": {"hosts": {"node": {"ansible_connection": "local", "ansible_python_interpreter": str(ROOT / ".venv/bin/python")}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(ROLE_PLAY)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "ansible" / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_LOCALHOST_WARNING": "False"}
    return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml"),
                           "-e", json.dumps({"entry": entry, **variables})],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not in .venv: run ansible/lint.sh")
def test_the_role_adds_the_signed_repository_so_that_apt_finds_the_package_there(built, tmp_path):
    """agent_proxy_package with agent_proxy_package_repository_url: the source and the key it
    writes (its paths pointed into a private apt tree) let apt fetch the package from
    `make apt-repo`'s folder served over HTTP; a second run changes nothing."""
    run(str(ROOT / "deb" / "apt-repo.sh"), env={**os.environ, "DEB_OUT": str(built["out"])})
    repo = built["out"] / "apt-repo"
    node = tmp_path / "node"
    options = apt_sandbox(node, None, None)
    port = free_port()
    server = Process("apt-repo-http", [str(PYTHON), "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(repo),
                                       str(port)], tmp_path / "http.log").start()
    try:
        wait_for_port("127.0.0.1", port, proc=server)
        variables = {"agent_proxy_package_repository_url": f"http://127.0.0.1:{port}/",
                     "agent_proxy_package_repository_key": str(repo / "agent-proxy-archive.gpg"),
                     # The role's OS paths (vars/main.yml; extra vars outrank them), in the private tree.
                     "__agent_proxy_package_sources_file": str(node / "etc/apt/sources.list.d/agent-proxy.list"),
                     "__agent_proxy_package_keyring": str(node / "usr/share/keyrings/agent-proxy-archive.gpg")}
        (node / "usr/share/keyrings").mkdir(parents=True)
        first = role_play(tmp_path, "repository.yml", **variables)
        assert first.returncode == 0, first.stdout + first.stderr
        assert re.search(r"node\s*: ok=3\s+changed=2 ", first.stdout), first.stdout
        source = (node / "etc/apt/sources.list.d/agent-proxy.list").read_text().splitlines()[-1]
        assert source == f"deb [signed-by={node}/usr/share/keyrings/agent-proxy-archive.gpg] http://127.0.0.1:{port}/ ./"
        run("apt-get", *options, "update")
        policy = run("apt-cache", *options, "policy", "agent-proxy").stdout
        assert f"Candidate: {field(built['deb'], 'Version')}" in policy
        again = role_play(tmp_path, "repository.yml", **variables)
        assert again.returncode == 0 and re.search(r"node\s*: ok=3\s+changed=0 ", again.stdout), again.stdout
    finally:
        server.stop()


@pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not in .venv: run ansible/lint.sh")
def test_the_role_refuses_a_repository_without_its_key_in_one_line(tmp_path):
    done = role_play(tmp_path, "main.yml", agent_proxy_package_repository_url="http://127.0.0.1:9/")
    assert done.returncode == 2
    assert "agent_proxy_package_repository_url (http://127.0.0.1:9/) needs agent_proxy_package_repository_key" in done.stdout
