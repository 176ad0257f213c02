"""`sandfleet worker --driver X` makes the driver registered as X, from its own settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from sandfleet.common.settings import Settings
from sandfleet.workers import registry
from sandfleet.workers.cli import load_plugin, make_driver


@pytest.mark.parametrize("name", ["docker", "podman", "vm"])
async def test_each_built_in_driver_is_registered_and_made_by_name(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_DOCKER_URL", "unix:///nonexistent/docker.sock")
    monkeypatch.setenv("SANDFLEET_PODMAN_URL", "unix:///nonexistent/podman.sock")
    monkeypatch.setenv("SANDFLEET_LIBVIRT_URI", "test:///default")
    monkeypatch.setenv("SANDFLEET_VM_DOMAIN_TYPE", "test")
    monkeypatch.setenv("SANDFLEET_VM_WORK_DIR", str(tmp_path))
    if name == "vm":
        pytest.importorskip("libvirt")
    driver = make_driver(load_plugin(name), Settings())
    try:
        assert driver.name == name
    finally:
        await driver.aclose()


def test_an_unknown_driver_names_those_installed() -> None:
    with pytest.raises(typer.BadParameter) as raised:
        load_plugin("firecracker")
    assert "no driver named 'firecracker' is installed" in str(raised.value)
    assert "docker, " in str(raised.value)
    with pytest.raises(registry.UnknownDriver):
        registry.load("firecracker")
