"""The wheel installs every package of the tree, under the one name `sandfleet`."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "common": "sandfleet.common",
    "gateway": "sandfleet.gateway",
    "workers": "sandfleet.workers",
}


def test_every_package_folder_is_listed_under_its_sandfleet_name() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {
        "sandfleet": "src/sandfleet",
        **{v: k for k, v in FOLDERS.items()},
    }
    found = {"sandfleet"}
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert set(setuptools["packages"]) == found


def test_the_built_in_drivers_register_like_any_other() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    drivers = project["entry-points"]["sandfleet.drivers"]
    assert drivers == {
        name: f"sandfleet.workers.drivers.{name}.plugin:plugin"
        for name in ("docker", "podman", "vm")
    }


def test_tests_share_helpers_only_through_tests_support() -> None:
    """No test imports another test module, the conftest, or bench/."""
    wrong = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                local = name == "tests" or name.startswith(("tests.", "bench"))
                if local and not name.startswith("tests.support"):
                    wrong.append(f"{path.relative_to(ROOT)}: {name}")
    assert wrong == []
