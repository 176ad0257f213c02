"""`pip install .` into a fresh virtual environment: one import package, `sandfleet`,
that nobody else's `common/` can shadow or overwrite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "src", "common", "gateway", "workers")

pytestmark = pytest.mark.integration


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with `pip install .` of a copy of the tree (the checkout stays clean)."""
    work = tmp_path_factory.mktemp("install")
    tree = work / "tree"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, symlinks=True)
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    made = run(sys.executable, "-m", "venv", work / "venv")
    assert made.returncode == 0, made.stderr
    installed = run(work / "venv" / "bin" / "pip", "install", "-q", tree)
    assert installed.returncode == 0, installed.stderr
    yield work / "venv"


def test_the_package_imports_and_the_bare_folder_names_do_not(venv: Path) -> None:
    python = venv / "bin" / "python"
    # Away from the checkout: `python -c` puts the working directory on sys.path.
    elsewhere = venv.parent
    ok = run(
        python, "-c", "import sandfleet; sandfleet.Client; sandfleet.SyncClient", cwd=elsewhere
    )
    assert ok.returncode == 0, ok.stderr
    for bare in ("common", "gateway", "workers", "sandfleet_cli"):
        refused = run(python, "-c", f"import {bare}", cwd=elsewhere)
        assert "ModuleNotFoundError" in refused.stderr, bare


def test_the_wheel_installs_nothing_but_sandfleet(venv: Path) -> None:
    [site] = (venv / "lib").glob("python3*/site-packages")
    [record] = site.glob("sandfleet-*.dist-info/RECORD")
    tops = {line.split(",", 1)[0].split("/", 1)[0] for line in record.read_text().splitlines()}
    assert {t for t in tops if not t.endswith(".dist-info") and t != ".."} == {"sandfleet"}
    assert (site / "sandfleet" / "py.typed").is_file()


def test_it_runs_beside_a_users_own_common_package(venv: Path, tmp_path: Path) -> None:
    for name in ("common", "gateway", "workers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user\\'s own')\n")
    cli = run(venv / "bin" / "sandfleet", "--help", cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "worker" in cli.stdout
    # `python -c` puts the working directory first on sys.path: the user's common/ wins
    # any import of `common`, and sandfleet never makes one.
    script = "from sandfleet.gateway.client import Client; from sandfleet.workers import registry"
    imported = run(venv / "bin" / "python", "-c", script, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    drivers = run(
        venv / "bin" / "python", "-c",
        "from sandfleet.workers import registry; print(' '.join(registry.installed()))",
        cwd=tmp_path,
    )  # fmt: skip
    assert drivers.stdout.split() == ["docker", "podman", "vm"]
