"""How the docker driver hands GPUs to a container: CDI where the engine has it on, the
NVIDIA device driver where it has the `nvidia` runtime, else CapabilityMissing; and how
long it trusts the engine's answer. (tests/integration/test_docker_gpus.py runs all
three against real daemons.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from sandfleet.common.errors import CapabilityMissing, SandboxError
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import ClaimedGpu, SandboxSpec
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import ContainerLimits
from sandfleet.workers.drivers.docker import driver as driver_module
from sandfleet.workers.drivers.docker.driver import DockerDriver
from sandfleet.workers.drivers.docker.gpu_route import (
    GpuRoute,
    device_requests,
    engine_version,
    gpu_support,
)
from sandfleet.workers.drivers.docker.spec import container_config

GPUS = (ClaimedGpu("GPU-aaaa", "nvidia.com/gpu=0"), ClaimedGpu("GPU-bbbb", "nvidia.com/gpu=3"))
CDI_ON = {"CDISpecDirs": ["/etc/cdi", "/var/run/cdi"], "Runtimes": {"runc": {}}}
CDI_OFF: dict[str, Any] = {"CDISpecDirs": [], "Runtimes": {"runc": {}}}
NVIDIA_RUNTIME = {"CDISpecDirs": [], "Runtimes": {"runc": {}, "nvidia": {"path": "x"}}}


def test_cdi_wins_where_the_engine_has_it_on() -> None:
    assert gpu_support("26.1.5+dfsg1", CDI_ON).route is GpuRoute.CDI
    assert gpu_support("25.0.0", {**NVIDIA_RUNTIME, "CDISpecDirs": ["/etc/cdi"]}).route is (
        GpuRoute.CDI
    )


def test_the_nvidia_runtime_is_the_fallback_without_cdi() -> None:
    assert gpu_support("26.1.5", NVIDIA_RUNTIME).route is GpuRoute.NVIDIA
    # Docker 20.10 (no CDI at all, whatever its info says) with the toolkit installed.
    old = {**NVIDIA_RUNTIME, "CDISpecDirs": ["/etc/cdi"]}
    assert gpu_support("20.10.24+dfsg1", old).route is GpuRoute.NVIDIA


@pytest.mark.parametrize(
    ("version", "info", "says"),
    [
        ("26.1.5", CDI_OFF, "has CDI turned off"),
        ("26.1.5", {}, "has CDI turned off"),
        ("26.1.5", {"Runtimes": ["nvidia"]}, "has CDI turned off"),  # not a mapping: ignored
        ("20.10.24+dfsg1", CDI_ON, "cannot inject CDI devices"),
        ("garbage", CDI_ON, "cannot inject CDI devices"),
    ],
)
def test_without_either_it_says_what_to_enable(
    version: str, info: dict[str, Any], says: str
) -> None:
    support = gpu_support(version, info)
    assert support.route is None
    assert says in support.detail
    assert '{"features": {"cdi": true}}' in support.detail
    assert "NVIDIA Container Toolkit (runtime `nvidia`)" in support.detail
    assert version in support.detail


def test_engine_versions() -> None:
    assert engine_version("26.1.5+dfsg1") == (26, 1)
    assert engine_version("25.0") == (25, 0)
    assert engine_version("24") == (0, 0)
    assert engine_version("x.y") == (0, 0)


def test_device_requests_name_exactly_the_claimed_gpus() -> None:
    assert device_requests(GpuRoute.CDI, GPUS) == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=0", "nvidia.com/gpu=3"]}
    ]
    assert device_requests(GpuRoute.NVIDIA, GPUS) == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-aaaa", "GPU-bbbb"], "Capabilities": [["gpu"]]}
    ]


def spec(gpus: tuple[ClaimedGpu, ...] = GPUS) -> SandboxSpec[ContainerBlock]:
    job = Job.model_validate(
        {"job_id": "j1", "driver": "docker", "template": {"image": "busybox", "command": ["true"]}}
    )
    return SandboxSpec.for_job(job, ContainerBlock(), driver="docker", worker_id="w", gpus=gpus)


def test_the_container_config_takes_the_route() -> None:
    host = container_config(spec(), ContainerLimits(), gpu_route=GpuRoute.NVIDIA)["HostConfig"]
    assert host["DeviceRequests"][0]["DeviceIDs"] == ["GPU-aaaa", "GPU-bbbb"]
    assert "DeviceRequests" not in container_config(spec(()), ContainerLimits())["HostConfig"]
    with pytest.raises(ValueError, match="GPU route"):
        container_config(spec(), ContainerLimits())


class FakeEngine:
    """The engine's version and info as the driver asks them, counted."""

    def __init__(self, version: str, info: dict[str, Any]) -> None:
        self.version, self.info, self.asked = version, info, 0

    async def answer_version(self) -> dict[str, Any]:
        return {"Version": self.version}

    async def answer_info(self) -> dict[str, Any]:
        self.asked += 1
        return self.info


@pytest.fixture
async def engine_and_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[FakeEngine, DockerDriver]]:
    engine = FakeEngine("26.1.5", CDI_OFF)
    driver = DockerDriver(url="unix:///nonexistent/docker.sock")
    monkeypatch.setattr(driver._docker, "version", engine.answer_version)
    monkeypatch.setattr(driver._docker.system, "info", engine.answer_info)

    async def no_such_image(*_: Any, **__: Any) -> None:
        raise DockerError(500, "image store unavailable")  # past the GPU check: stop here

    monkeypatch.setattr(driver._docker.images, "inspect", no_such_image)
    yield engine, driver
    await driver.aclose()


async def test_the_engines_answer_is_kept_for_a_while(
    engine_and_driver: tuple[FakeEngine, DockerDriver],
) -> None:
    engine, driver = engine_and_driver
    for _ in range(3):
        with pytest.raises(CapabilityMissing, match="has CDI turned off"):
            await driver.create(spec())
    assert engine.asked == 1
    with pytest.raises(SandboxError, match="image store unavailable"):
        await driver.create(spec(()))  # a job without GPUs never asks
    assert engine.asked == 1


async def test_a_restarted_engine_is_asked_again_once_the_answer_is_old(
    engine_and_driver: tuple[FakeEngine, DockerDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, driver = engine_and_driver
    with pytest.raises(CapabilityMissing):
        await driver.create(spec())
    engine.info = CDI_ON  # dockerd restarted with CDI on
    monkeypatch.setattr(driver_module, "GPU_SUPPORT_TTL_SECONDS", -1.0)  # the answer is old
    with pytest.raises(SandboxError, match="image store unavailable") as failed:
        await driver.create(spec())
    assert not isinstance(failed.value, CapabilityMissing)
    assert engine.asked == 2


async def test_a_failed_start_makes_the_next_gpu_job_ask_again(
    engine_and_driver: tuple[FakeEngine, DockerDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, driver = engine_and_driver
    engine.info = CDI_ON
    with pytest.raises(SandboxError, match="image store unavailable"):
        await driver.create(spec())

    async def refused(self: DockerContainer, **_: Any) -> None:
        raise DockerError(500, 'could not select device driver "cdi" with capabilities: []')

    monkeypatch.setattr(DockerContainer, "start", refused)
    with pytest.raises(SandboxError, match="could not select device driver"):
        await driver.start("abc")
    engine.info = CDI_OFF  # it had been restarted with CDI off
    with pytest.raises(CapabilityMissing, match="has CDI turned off"):
        await driver.create(spec())
    assert engine.asked == 2
