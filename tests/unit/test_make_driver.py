"""`sandfleet worker --driver X` drives runtime X, each from its own settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.models import Driver
from common.settings import Settings
from workers.cli import make_driver


@pytest.mark.parametrize("kind", list(Driver))
async def test_each_driver_kind_gets_its_own_driver(kind: Driver, tmp_path: Path) -> None:
    settings = Settings(
        docker_url="unix:///nonexistent/docker.sock",
        podman_url="unix:///nonexistent/podman.sock",
        libvirt_uri="test:///default",
        vm_domain_type="test",
        vm_work_dir=tmp_path,
    )
    driver = make_driver(kind, settings)
    try:
        assert driver.kind is kind
    finally:
        await driver.aclose()
