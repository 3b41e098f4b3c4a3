"""ansible/check_argument_specs.py: every role's defaults match its documented argument specs."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Loaded by path: a folder named "ansible" on sys.path must not stand in for the real package.
_spec = importlib.util.spec_from_file_location("check_argument_specs", ROOT / "ansible" / "check_argument_specs.py")
check_argument_specs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_argument_specs)

GOOD_DEFAULTS = textwrap.dedent("""\
    ---
    demo_port: 8002
    demo_names: []
    """)
GOOD_SPECS = textwrap.dedent("""\
    ---
    argument_specs:
      main:
        short_description: A demo
        options:
          demo_port:
            type: int
            default: 8002
            description: The port.
          demo_names:
            type: list
            elements: str
            default: []
            description: Some names.
    """)


def make_role(tmp_path, defaults=GOOD_DEFAULTS, specs=GOOD_SPECS, internals=None):
    role = tmp_path / "roles" / "demo"
    for sub in ("defaults", "meta", "tasks", "vars"):
        (role / sub).mkdir(parents=True)
    (role / "tasks" / "main.yml").write_text("---\n[]\n")
    (role / "defaults" / "main.yml").write_text(defaults)
    (role / "meta" / "argument_specs.yml").write_text(specs)
    if internals is not None:
        (role / "vars" / "main.yml").write_text(internals)
    return tmp_path / "roles"


def test_the_repository_roles_agree_with_their_specs():
    assert check_argument_specs.check(ROOT / "ansible" / "roles") == []


def test_a_consistent_role_passes(tmp_path):
    roles = make_role(tmp_path, internals="__demo_path: /opt/demo\n")
    assert check_argument_specs.check(roles) == []
    assert check_argument_specs.main(["check", str(roles)]) == 0


@pytest.mark.parametrize(
    "defaults, specs, expected",
    [
        (GOOD_DEFAULTS.replace("8002", "8003"), GOOD_SPECS, "demo_port: default 8003 differs"),
        (GOOD_DEFAULTS.replace("8002", '"8002"'), GOOD_SPECS, "demo_port: default '8002' differs"),
        (GOOD_DEFAULTS + "demo_extra: true\n", GOOD_SPECS, "demo_extra: not documented"),
        (GOOD_DEFAULTS.replace("demo_names: []\n", ""), GOOD_SPECS, "main.demo_names: documented but not in"),
        (GOOD_DEFAULTS.replace("8002", '"x"'), GOOD_SPECS.replace("default: 8002", 'default: "x"'), "default 'x' is not a int"),
        (GOOD_DEFAULTS, GOOD_SPECS.replace("        description: The port.\n", ""), "main.demo_port: no description"),
        (GOOD_DEFAULTS + "port: 1\n", GOOD_SPECS, "port: does not start with the role name"),
    ],
    ids=["other default", "other type", "undocumented", "missing default", "type mismatch", "no description", "no prefix"],
)
def test_a_mismatch_is_reported(tmp_path, capsys, defaults, specs, expected):
    roles = make_role(tmp_path, defaults, specs)
    problems = check_argument_specs.check(roles)
    assert any(expected in problem for problem in problems), problems
    assert check_argument_specs.main(["check", str(roles)]) == 1
    assert expected in capsys.readouterr().err


def test_internal_variables_need_the_double_underscore(tmp_path):
    roles = make_role(tmp_path, internals="demo_path: /opt/demo\n")
    assert check_argument_specs.check(roles) == [
        f"{roles}/demo/vars/main.yml: demo_path: internal variables start with '__demo_'"
    ]
