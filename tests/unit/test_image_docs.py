"""packer/README.md, as an operator follows it: the example seed is one first boot accepts,
the virt-install command is one virt-install accepts, and `make image` on a fresh clone
gets the ansible-playbook its build runs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent_proxy import seed

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "packer" / "README.md").read_text()


def _block_after(text: str) -> str:
    """The first ```sh block after TEXT in the page."""
    return re.search(r"```sh\n(.*?)```", PAGE[PAGE.index(text):], re.S).group(1)


@pytest.mark.parametrize("source", ["page", "example file"])
def test_the_documented_seed_is_one_first_boot_accepts(tmp_path, source):
    text = _block_after("A node at 10.1.2.3") if source == "page" else (ROOT / "appliance" / "seed.env.example").read_text()
    (tmp_path / "seed.env").write_text(text)
    run = subprocess.run([sys.executable, "-m", "agent_proxy.seed", "--seed-dir", str(tmp_path), "--get", *seed.KEYS],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    values = dict(zip(seed.KEYS, run.stdout.split("\n")))
    assert values["PROXY_ID"] == "site-a" and values["UPSTREAM_URL"] == "https://8.7.6.5:3302", values


@pytest.mark.skipif(shutil.which("virt-install") is None, reason="virt-install missing (make deps installs virtinst)")
def test_the_virt_install_command_is_accepted(tmp_path):
    command = _block_after("libvirt (`virt-install`").replace("\\\n", " ").strip()
    assert command.startswith("virt-install ") and "\n" not in command, command
    for name in ("key.pub", "seed.env"):
        (tmp_path / name).write_text("x\n")
        command = command.replace(f"/path/{name}", str(tmp_path / name))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "node1.qcow2"), "64M"], check=True, timeout=60)
    # libvirt's built-in test driver (never a libvirtd): the command is parsed and its
    # domain made, nothing boots.
    command = command.replace("virt-install ", "virt-install --connect test:///default --print-xml ", 1)
    run = subprocess.run(command, shell=True, cwd=tmp_path,
                         env={**os.environ, "LIBVIRT_DEFAULT_URI": "test:///default"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    args = re.findall(r'<qemu:arg value="([^"]*)"/>', run.stdout)
    assert args == ["-fw_cfg", f"name=opt/agent-proxy/authorized_keys,file={tmp_path}/key.pub",
                    "-fw_cfg", f"name=opt/agent-proxy/seed.env,file={tmp_path}/seed.env"], run.stdout


def test_make_image_on_a_fresh_clone_installs_ansible_before_the_build(tmp_path):
    """The Makefile's image target, with stand-ins for the slow parts: ansible/lint.sh makes
    .venv/bin/ansible-playbook, packer/build-image.sh needs it, as packer/run-playbook.sh does."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "apt-packages").write_text("bash\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed").write_text("")
    for script, body in {
        "ansible/lint.sh": 'echo lint >> "$0.ran"; printf "#!/bin/sh\\n" > .venv/bin/ansible-playbook; chmod +x .venv/bin/ansible-playbook',
        "packer/build-image.sh": '[ -x .venv/bin/ansible-playbook ] || { echo "ansible-playbook missing"; exit 2; }; echo built',
    }.items():
        path = tmp_path / script
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    for _ in range(2):
        run = subprocess.run(["make", "image"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "built" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "ansible" / "lint.sh.ran").read_text() == "lint\n"  # once: not again when it is there
