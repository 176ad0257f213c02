"""Docker and Podman keep the warm-sandbox contract, against their real runtimes
(dockerd, the podman service)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.models import Job
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, SandboxDriver
from sandfleet.workers.drivers.warm_contract import WarmContract, WarmJobMaker
from tests.support.runtimes import ROOT

pytestmark = pytest.mark.integration

ENTRYPOINT_IMAGE = "sandfleet-test/warm-entrypoint:latest"


def job_maker(driver: str, default_image: str) -> WarmJobMaker:
    def make(
        job_id: str,
        *,
        command: list[str],
        environment: dict[str, str] | None = None,
        cpu: float | None = None,
        memory: str | None = None,
        image: str | None = None,
    ) -> Job:
        template = {
            "image": image or default_image,
            "command": command,
            "environment": environment or {},
        }
        resources = {k: v for k, v in {"cpu": cpu, "memory": memory}.items() if v is not None}
        body = {
            "job_id": job_id,
            "driver": driver,
            "template": template,
            "resource_requirements": resources,
        }
        return Job.model_validate_json(json.dumps(body))

    return make


def build_entrypoint_image(engine: str, base: str, tmp: Path, env: dict[str, str]) -> str:
    """An image whose Entrypoint and Cmd a taken warm sandbox must run, as cold."""
    (tmp / "Containerfile").write_text(
        f'FROM {base}\nENTRYPOINT ["echo", "entrypoint-says"]\nCMD ["default-cmd"]\n'
    )
    command = [engine, "build", "-q", "-t", ENTRYPOINT_IMAGE, "-f", str(tmp / "Containerfile")]
    subprocess.run([*command, str(tmp)], check=True, timeout=120, env=env, capture_output=True)
    return ENTRYPOINT_IMAGE


def made_by(name: str) -> Callable[[], SandboxDriver[Any]]:
    """A new driver object per call, as a worker makes one."""
    plugin = registry.load(name)
    return lambda: plugin.make(plugin.settings(), DriverHost(cdi_kind="nvidia.com/gpu"))


class TestDockerWarm(WarmContract):
    @pytest.fixture
    def make_driver(self) -> Callable[[], SandboxDriver[Any]]:
        return made_by("docker")

    @pytest.fixture
    def make_job(self, test_image: str) -> WarmJobMaker:
        return job_maker("docker", test_image)

    @pytest.fixture
    def entrypoint_image(self, test_image: str, tmp_path: Path) -> str:
        return build_entrypoint_image("docker", test_image, tmp_path, dict(os.environ))


class TestPodmanWarm(WarmContract):
    @pytest.fixture
    def make_driver(self) -> Callable[[], SandboxDriver[Any]]:
        return made_by("podman")

    @pytest.fixture
    def make_job(self, podman_image: str) -> WarmJobMaker:
        return job_maker("podman", podman_image)

    @pytest.fixture
    def entrypoint_image(self, podman_image: str, tmp_path: Path) -> str:
        env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
        return build_entrypoint_image("podman", podman_image, tmp_path, env)
