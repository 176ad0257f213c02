"""The limits every container gets, from the settings to Docker's and libpod's create
bodies (the integration tests inspect what the runtimes made of them)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import ClaimedGpu, SandboxSpec
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import (
    DEFAULT_CAPABILITIES,
    ContainerLimits,
    host_cpus,
    host_memory,
)
from sandfleet.workers.drivers.docker.gpu_route import GpuRoute
from sandfleet.workers.drivers.docker.plugin import DockerSettings
from sandfleet.workers.drivers.docker.spec import container_config
from sandfleet.workers.drivers.podman.plugin import PodmanSettings
from sandfleet.workers.drivers.podman.spec import spec_generator

LIMITS = ContainerLimits(
    default_cpu=1.5,
    max_cpu=4,
    default_memory=2**30,
    max_memory=2**33,
    pids_limit=100,
    log_max_bytes=2**20,
    log_max_files=2,
    capabilities=("CHOWN", "KILL"),
)


def spec(*, gpus: tuple[ClaimedGpu, ...] = (), **resources: Any) -> SandboxSpec[ContainerBlock]:
    job = Job.model_validate(
        {
            "job_id": "j1",
            "driver": "docker",
            "resource_requirements": resources,
            "template": {"image": "busybox", "command": ["true"], "environment": {"A": "1"}},
        }
    )
    return SandboxSpec.for_job(job, ContainerBlock(), driver="docker", worker_id="w", gpus=gpus)


def test_the_settings_and_their_defaults() -> None:
    limits = DockerSettings().limits
    assert limits == ContainerLimits()
    assert (limits.default_cpu, limits.max_cpu) == (1.0, host_cpus())
    assert (limits.default_memory, limits.max_memory) == (min(2**31, host_memory()), host_memory())
    assert (limits.pids_limit, limits.log_max_bytes, limits.log_max_files) == (4096, 10 << 20, 3)
    assert limits.capabilities == DEFAULT_CAPABILITIES
    assert DockerSettings().create_timeout_seconds == 60


def test_the_settings_read_one_set_of_names_for_both_drivers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "DEFAULT_CPU": "500m", "MAX_CPU": "2", "DEFAULT_MEMORY": "64Mi", "MAX_MEMORY": "1Gi",
        "PIDS_LIMIT": "64", "LOG_MAX_BYTES": "1Mi", "LOG_MAX_FILES": "5",
        "CAPABILITIES": "chown, CAP_KILL", "CREATE_TIMEOUT_SECONDS": "9",
    }.items():  # fmt: skip
        monkeypatch.setenv(f"SANDFLEET_CONTAINER_{name}", value)
    expected = ContainerLimits(
        default_cpu=0.5,
        max_cpu=2,
        default_memory=64 << 20,
        max_memory=1 << 30,
        pids_limit=64,
        log_max_bytes=1 << 20,
        log_max_files=5,
        capabilities=("CHOWN", "KILL"),
    )
    assert DockerSettings().limits == PodmanSettings().limits == expected
    assert DockerSettings().create_timeout_seconds == 9


def test_no_capabilities_at_all_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_CONTAINER_CAPABILITIES", "")
    assert DockerSettings().limits.capabilities == ()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"default_cpu": 3, "max_cpu": 2}, "default_cpu 3 is above max_cpu 2"),
        ({"default_memory": 2**30, "max_memory": 2**29}, "default_memory 1073741824 is above"),
        ({"max_cpu": 0.001}, "greater than or equal to 0.01"),
        ({"max_memory": "1Mi"}, "memory must be between 6Mi and 16Ti"),
        ({"capabilities": "ALL"}, "'ALL' is not one capability name"),
        ({"capabilities": "CHOWN;KILL"}, "'CHOWN;KILL' is not one capability name"),
        ({"pids_limit": 0}, "greater than 0"),
    ],
)
def test_settings_that_would_undo_a_limit_are_refused(
    settings: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        DockerSettings(**settings)
    assert reason in str(raised.value)


def test_docker_gets_every_limit() -> None:
    host = container_config(spec(cpu=0.5, memory="64Mi"), LIMITS)["HostConfig"]
    assert host == {
        "NanoCpus": 500_000_000,
        "Memory": 64 << 20,
        "PidsLimit": 100,
        "CapDrop": ["ALL"],
        "CapAdd": ["CAP_CHOWN", "CAP_KILL"],
        "SecurityOpt": ["no-new-privileges"],
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "1048576", "max-file": "2"}},
    }


def test_podman_gets_every_limit() -> None:
    body = spec_generator(spec(cpu=0.5, memory="64Mi"), LIMITS)
    assert body["resource_limits"] == {
        "cpu": {"quota": 50_000, "period": 100_000},
        "memory": {"limit": 64 << 20},
        "pids": {"limit": 100},
    }
    assert (body["cap_drop"], body["cap_add"]) == (["ALL"], ["CAP_CHOWN", "CAP_KILL"])
    assert body["no_new_privileges"] is True
    assert body["log_configuration"] == {"driver": "k8s-file", "size": 1 << 20}


def test_a_job_without_resources_gets_the_defaults() -> None:
    host = container_config(spec(), LIMITS)["HostConfig"]
    assert (host["NanoCpus"], host["Memory"]) == (1_500_000_000, 2**30)
    limits = spec_generator(spec(), LIMITS)["resource_limits"]
    assert (limits["cpu"]["quota"], limits["memory"]["limit"]) == (150_000, 2**30)


def test_the_smallest_cpu_share_is_never_unlimited() -> None:
    # 1e-10 CPUs made NanoCpus=0, which Docker reads as "no limit": such a job is refused
    # now (test_container_block), and the smallest share it may ask maps to a real limit.
    assert container_config(spec(cpu=0.01), LIMITS)["HostConfig"]["NanoCpus"] == 10_000_000
    assert spec_generator(spec(cpu=0.01), LIMITS)["resource_limits"]["cpu"]["quota"] == 1000


def test_gpus_go_as_cdi_devices() -> None:
    gpus = (ClaimedGpu("GPU-1", "nvidia.com/gpu=0"),)
    host = container_config(spec(gpus=gpus), LIMITS, gpu_route=GpuRoute.CDI)["HostConfig"]
    assert host["DeviceRequests"] == [{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=0"]}]
    assert spec_generator(spec(gpus=gpus), LIMITS)["devices"] == [{"path": "nvidia.com/gpu=0"}]


def test_no_job_names_its_own_gpus_to_the_nvidia_runtime() -> None:
    hostile = SandboxSpec.for_job(
        Job.model_validate({
            "job_id": "j2", "driver": "docker",
            "template": {"image": "busybox", "environment": {"NVIDIA_VISIBLE_DEVICES": "all"}},
        }),
        ContainerBlock(), driver="docker", worker_id="w",
    )  # fmt: skip
    for made in (spec(), hostile):
        env = container_config(made, LIMITS)["Env"]
        assert [e for e in env if e.startswith("NVIDIA_VISIBLE_DEVICES=")] == [
            "NVIDIA_VISIBLE_DEVICES=void"
        ]
        assert spec_generator(made, LIMITS)["env"]["NVIDIA_VISIBLE_DEVICES"] == "void"
