"""A job's sandbox as Docker's container-create body (Engine API `ContainerConfig`)."""

from __future__ import annotations

from typing import Any

from sandfleet.workers.drivers.base import SandboxSpec
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.container_settings import ContainerLimits, container_environment
from sandfleet.workers.drivers.docker.gpu_route import GpuRoute, device_requests
from sandfleet.workers.drivers.warm_shim import SHIM_ENTRYPOINT


def container_config(
    spec: SandboxSpec[ContainerBlock],
    limits: ContainerLimits,
    *,
    gpu_route: GpuRoute | None = None,
) -> dict[str, Any]:
    """`gpu_route`: how this engine takes GPUs; a spec with GPUs needs one."""
    config: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{k}={v}" for k, v in container_environment(spec.environment).items()],
        "Labels": dict(spec.labels),
        "HostConfig": host_config(spec, limits, gpu_route=gpu_route),
    }
    if spec.command:
        config["Cmd"] = list(spec.command)
    return config


def host_config(
    spec: SandboxSpec[ContainerBlock],
    limits: ContainerLimits,
    *,
    gpu_route: GpuRoute | None = None,
) -> dict[str, Any]:
    """Every container is bounded: cpu, memory, processes and log size; it holds only
    the host's capability set and can never gain privileges (setuid binaries)."""
    host: dict[str, Any] = {
        "NanoCpus": round(limits.cpu(spec.cpu) * 1e9),
        "Memory": limits.memory(spec.memory_bytes),
        "PidsLimit": limits.pids_limit,
        "CapDrop": ["ALL"],
        "CapAdd": [f"CAP_{name}" for name in limits.capabilities],
        "SecurityOpt": ["no-new-privileges"],
        # json-file whatever the daemon's default driver: it is the one with a size cap
        # that `docker logs` (the job's output) still reads.
        "LogConfig": {
            "Type": "json-file",
            "Config": {
                "max-size": str(limits.log_max_bytes),
                "max-file": str(limits.log_max_files),
            },
        },
    }
    if spec.gpus:
        if gpu_route is None:
            raise ValueError("a sandbox with GPUs needs the engine's GPU route")
        host["DeviceRequests"] = device_requests(gpu_route, spec.gpus)
    return host


def warm_container_config(
    spec: SandboxSpec[ContainerBlock], limits: ContainerLimits
) -> dict[str, Any]:
    """A cold container's config for `spec` whose main process is the warm shim, its
    stdin open for the job (StdinOnce: closed when the attached worker goes)."""
    return {
        **container_config(spec, limits),
        "Entrypoint": list(SHIM_ENTRYPOINT),
        "Cmd": [],
        "AttachStdin": True,
        "OpenStdin": True,
        "StdinOnce": True,
    }
