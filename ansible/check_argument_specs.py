#!/usr/bin/env python3
"""Check that each role's defaults and its meta/argument_specs.yml agree.

For every role under the given folder (default: ansible/roles):
- every variable in defaults/main.yml is an option of the ``main`` entry point, with a
  description, a ``type`` matching its default value and the same ``default``;
- every option of every entry point has a value in defaults/main.yml (unless it is
  ``required``), so nothing documented is missing;
- variables carry the role's name as prefix, and vars/main.yml holds only ``__``-prefixed
  internals.

Prints one line per problem and exits 1 if there is any. ``check(roles_dir)`` returns the
lines, for tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

# argument_specs type -> the Python types a YAML default of that type loads as.
TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "path": (str,),
    "raw": (object,),
}


def _load(path: Path, problems: list[str]) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: must hold a mapping")
        return {}
    return data


def _type_matches(spec_type: str, value) -> bool:
    if isinstance(value, bool) and spec_type in ("int", "float"):
        return False
    return isinstance(value, TYPES[spec_type])


def check_role(role: Path) -> list[str]:
    problems: list[str] = []
    name = role.name
    defaults_file = role / "defaults" / "main.yml"
    specs_file = role / "meta" / "argument_specs.yml"
    defaults = _load(defaults_file, problems) if defaults_file.exists() else {}
    if not specs_file.exists():
        return problems + [f"{specs_file}: missing"]
    entry_points = _load(specs_file, problems).get("argument_specs") or {}
    if "main" not in entry_points:
        problems.append(f"{specs_file}: no 'main' entry point")
    main_options = (entry_points.get("main") or {}).get("options") or {}

    for var, value in defaults.items():
        where = f"{defaults_file}: {var}"
        if not var.startswith(f"{name}_"):
            problems.append(f"{where}: does not start with the role name '{name}_'")
        spec = main_options.get(var)
        if spec is None:
            problems.append(f"{where}: not documented in {specs_file} (main)")
            continue
        if "default" not in spec:
            problems.append(f"{where}: {specs_file} gives no default (defaults say {value!r})")
        elif spec["default"] != value or type(spec["default"]) is not type(value):
            problems.append(f"{where}: default {value!r} differs from {specs_file}: {spec['default']!r}")

    for entry, body in entry_points.items():
        for var, spec in ((body or {}).get("options") or {}).items():
            where = f"{specs_file}: {entry}.{var}"
            spec = spec or {}
            spec_type = spec.get("type")
            if spec_type not in TYPES:
                problems.append(f"{where}: type must be one of {', '.join(TYPES)}, got {spec_type!r}")
            elif "default" in spec and spec["default"] is not None and not _type_matches(spec_type, spec["default"]):
                problems.append(f"{where}: default {spec['default']!r} is not a {spec_type}")
            if not spec.get("description"):
                problems.append(f"{where}: no description")
            if var not in defaults and not spec.get("required"):
                problems.append(f"{where}: documented but not in {defaults_file}")

    vars_file = role / "vars" / "main.yml"
    if vars_file.exists():
        for var in _load(vars_file, problems):
            if not var.startswith(f"__{name}_"):
                problems.append(f"{vars_file}: {var}: internal variables start with '__{name}_'")
    return problems


def check(roles_dir: str | Path) -> list[str]:
    roles = sorted(p for p in Path(roles_dir).iterdir() if (p / "tasks").is_dir())
    if not roles:
        return [f"{roles_dir}: no roles found"]
    return [problem for role in roles for problem in check_role(role)]


def main(argv: list[str]) -> int:
    roles_dir = argv[1] if len(argv) > 1 else str(Path(__file__).with_name("roles"))
    problems = check(roles_dir)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{roles_dir}: defaults and argument specs agree")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
