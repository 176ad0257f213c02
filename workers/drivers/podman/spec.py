"""A job's sandbox as libpod's container-create body (`SpecGenerator`)."""

from __future__ import annotations

from typing import Any

from sandfleet.workers.drivers.base import SandboxSpec
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import ContainerLimits, container_environment
from sandfleet.workers.drivers.warm_shim import SHIM_ENTRYPOINT

CPU_PERIOD_US = 100_000


def spec_generator(spec: SandboxSpec[ContainerBlock], limits: ContainerLimits) -> dict[str, Any]:
    """Every container is bounded: cpu, memory, processes and log size; it holds only
    the host's capability set and can never gain privileges (setuid binaries)."""
    body: dict[str, Any] = {
        "name": spec.name,
        "image": spec.image,
        "env": container_environment(spec.environment),
        "labels": dict(spec.labels),
        "devices": [{"path": device} for device in spec.gpu_devices],
        "resource_limits": resource_limits(spec, limits),
        "cap_drop": ["ALL"],
        "cap_add": [f"CAP_{name}" for name in limits.capabilities],
        "no_new_privileges": True,
        # k8s-file whatever containers.conf says: journald ignores the size cap.
        "log_configuration": {"driver": "k8s-file", "size": limits.log_max_bytes},
    }
    if spec.command:
        body["command"] = list(spec.command)
    return body


def warm_spec_generator(
    spec: SandboxSpec[ContainerBlock], limits: ContainerLimits
) -> dict[str, Any]:
    """A cold container's body for `spec` whose main process is the warm shim, its
    stdin open for the job (closed by conmon when the attached worker goes)."""
    return {
        **spec_generator(spec, limits),
        "entrypoint": list(SHIM_ENTRYPOINT),
        "command": [],
        "stdin": True,
    }


def resource_limits(spec: SandboxSpec[ContainerBlock], limits: ContainerLimits) -> dict[str, Any]:
    quota = round(limits.cpu(spec.cpu) * CPU_PERIOD_US)
    return {
        "cpu": {"quota": quota, "period": CPU_PERIOD_US},
        "memory": {"limit": limits.memory(spec.memory_bytes)},
        "pids": {"limit": limits.pids_limit},
    }
