"""Docker, Podman and the VM driver keep the driver contract, against their real runtimes
(dockerd, the podman service, libvirtd with QEMU/TCG)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.models import Job
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, SandboxDriver
from sandfleet.workers.drivers.contract import DriverContract, JobMaker

pytestmark = pytest.mark.integration


async def registered(name: str, **settings: Any) -> SandboxDriver[Any]:
    plugin = registry.load(name)
    return plugin.make(plugin.settings(**settings), DriverHost(cdi_kind="nvidia.com/gpu"))


def shell_job(
    driver: str,
    image: str,
    job_id: str,
    line: str,
    exit_code: int,
    run_seconds: float,
    **block: Any,
) -> Job:
    script = f"echo {line}; sleep {run_seconds}; exit {exit_code}"
    template = {"image": image, "command": ["sh", "-c", script], "driver_config": block}
    return Job.model_validate_json(
        json.dumps({"job_id": job_id, "driver": driver, "template": template})
    )


class TestDockerContract(DriverContract):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[SandboxDriver[Any]]:
        made = await registered("docker")
        yield made
        await made.aclose()

    @pytest.fixture
    def make_job(self, test_image: str) -> JobMaker:
        def make(job_id: str, *, line: str, exit_code: int = 0, run_seconds: float = 0) -> Job:
            return shell_job("docker", test_image, job_id, line, exit_code, run_seconds)

        return make


class TestPodmanContract(DriverContract):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[SandboxDriver[Any]]:
        made = await registered("podman")
        yield made
        await made.aclose()

    @pytest.fixture
    def make_job(self, podman_image: str) -> JobMaker:
        def make(job_id: str, *, line: str, exit_code: int = 0, run_seconds: float = 0) -> Job:
            return shell_job("podman", podman_image, job_id, line, exit_code, run_seconds)

        return make


class TestVmContract(DriverContract):
    @pytest.fixture
    async def driver(self, vm_work_dir: Path) -> AsyncIterator[SandboxDriver[Any]]:
        made = await registered("vm", domain_type="qemu", work_dir=vm_work_dir)
        yield made
        await made.aclose()

    @pytest.fixture
    def make_job(self, vm_guest: dict[str, str]) -> JobMaker:
        def make(job_id: str, *, line: str, exit_code: int = 0, run_seconds: float = 0) -> Job:
            return shell_job(
                "vm", vm_guest["kernel"], job_id, line, exit_code, run_seconds,
                initrd=vm_guest["initrd"],
            )  # fmt: skip

        return make
